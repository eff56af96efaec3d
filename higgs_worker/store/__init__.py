"""What lives on the volume and is shared by workers: the model store (``model_store``), the result cache
(``result_cache``), and what they are built on (``volume_lock``, ``atomic_file``)."""
