"""The job, before the models: its input checked field by field (``schema``), its plan computed once
(``plan``), what the model reads (``rendering``), and the dry run that shows it (``dry_run``)."""
