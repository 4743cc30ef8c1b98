"""Every strategy fact in one package: FSDP2 grouping, the FSDP1 policy, rank-0 loading, root reuse, clipping,
export gathering, the selection's reduce op, the checkpointing strategy, and (``private.py``) every private name
of torch and Lightning this project reads. Nothing here is imported by the adapters' forward path."""
