"""How the processes of a job work together: collectives over the trainer ranks
(:mod:`~plait.parallel.dist`), FSDP2 sharding (:mod:`~plait.parallel.fsdp`), and the
heartbeat that tells a launcher whether each rank is alive and progressing
(:mod:`~plait.parallel.heartbeat`). Placement, roles and launchers build on these in
:mod:`plait.runtime`."""
