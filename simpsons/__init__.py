"""Train the 42-class Simpsons classifier with Ray Train and Tune, data and results in object storage.

Two pipelines, one module per concept:

    ingest   sources -> archive -> prepare -> dataset -> storage
             fetch a folder, archive, URL or Drive link; unpack it safely; find its layout, check
             and split the images (data); decode them once into uint8 arrays with a manifest
             (dataset: the packed format and its per-node cache); upload to S3

    train    config -> dataset -> augment -> model / weights / loss -> train -> metrics -> report
             typed settings; the packed splits resident on the device; batched augmentation
             presets; the original residual network or a torchvision backbone and its starting
             weights; focal loss; train_one_epoch / evaluate under Ray Train (DDP, mixed
             precision); exact per-class scores from summed confusion matrices; best/ with its
             checkpoint, exported model (deploy), metrics and pictures

Around them: `cluster` (joining Ray, what the cluster can hold, the driver's checks), `checkpoint`
(the one owner of the checkpoint's layout, format version and provenance), `tune` and
`sweep_report` (the sweep and its report), `inference` (evaluate and predict from a checkpoint),
`cli` (what the jobs in jobs/ share) and `files` (hashing, atomic writes: no package imports).
"""
