"""Train the 42-class Simpsons classifier with Ray Train and Tune, data and results in object storage.

Two pipelines, one module per concept:

    ingest   sources -> archive -> prepare -> packed dataset -> storage
             fetch a folder, archive, URL or Drive link; unpack it safely; check and split the
             images; decode them once into uint8 arrays with a manifest; upload to S3

    train    config -> loader -> augment -> model / loss -> train -> metrics -> report
             typed settings; the packed splits resident on the device; batched augmentation;
             the original residual network and focal loss; train_one_epoch / evaluate under
             Ray Train (DDP, mixed precision); exact per-class scores from summed confusion
             matrices; best/ with its checkpoint, metrics and pictures

Around them: `cluster` (joining Ray, what the cluster can hold, the driver's checks), `checkpoint`
(the one owner of the checkpoint's layout and provenance), `tune` (the sweep), `inference`
(evaluate and predict from a checkpoint) and `cli` (what the jobs in jobs/ share).
"""
