"""What every model family shares: the method contract (:mod:`.contract`), the registries
(:mod:`.registry`), mechanics to call (EMA teachers, queues, masking, multi-crop:
:mod:`.mechanics`) and opening a saved run (:mod:`.saved`)."""
