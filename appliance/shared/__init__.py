"""What several machines share when the roles run apart (APPLIANCE_SHARED_STATE=gs://bucket/prefix).

    bucket.py    the shared folder on GCS (one client, bounded calls)
    registry.py  the model registry: versions and the ``current`` pointer on GCS, mirrored into each node's registry
    journal.py   the annotation journal: Label Studio writes it to GCS, trainers mirror it into their local journal
    lock.py      one training run at a time across machines: a PostgreSQL advisory lock, else a GCS lease

Without APPLIANCE_SHARED_STATE none of this is used: the registry and the journal are folders of the data dir.
"""
