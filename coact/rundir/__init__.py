"""The run directory: its one owner of file names (`layout`), crash-safe writes (`files`)
and the typed reader of a finished run (`read`)."""
