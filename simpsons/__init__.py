"""Train the 42-class Simpsons classifier with Ray Train and Tune, data and results in object storage.

Two pipelines, one module per concept:

    ingest   sources -> archive -> prepare -> dataset -> storage
             fetch a folder, archive, URL or Drive link; unpack it safely; find its layout, check
             and split the images (data); decode them once into uint8 arrays with a manifest
             (dataset: the packed format and its per-node cache); upload to S3

    train    driver -> worker -> engine, with the recipe in between
             driver   fit: every check before Ray, the dataset, the Ray Train run, best/ (report)
             worker   the Ray Train loop on each worker: data resident on the device, restore,
                      epochs, checkpoints, TensorBoard and MLflow from rank 0
             recipe   the one place a config becomes objects: model, loss, optimizer, schedule,
                      the per-epoch plan (image side, presets, precision)
             engine   step, epoch, evaluate in plain PyTorch with explicit inputs: no Ray, no config
             below them: augment (batched presets), model / weights, loss, metrics, data

Around them: `config` (typed settings), `names` (names and defaults several modules share),
`cluster` (joining Ray, what the cluster can hold), `checkpoint` (the one owner of the
checkpoint's layout, format version and provenance), `tune` and `sweep_report` (sweeps),
`inference`, `deploy`, `label` and `serve` (using the model), `tracking` (MLflow), `spot`
(reclaim notices), `errors` (the user-facing error mark), `logs` and `files` (hashing, atomic
writes, partial folders, the node lock). `cli` is the jobs' plumbing; the library never imports it.
"""
