"""Drop-in signatures of popular SSM libraries, running ssmc ops.

    from ssmc.compat.mamba_ssm import mamba_chunk_scan_combined, selective_state_update, \
        selective_scan_fn
    from ssmc.compat.fla import chunk_simple_gla, chunk_gla, fused_recurrent_simple_gla

Each shim maps the library's arguments, layouts, defaults and return conventions onto a
definition in the ssmc language; an argument it cannot honour raises `ssmc.UnsupportedError`
naming that argument. Every shim also takes keyword-only `backend=` and `lowering=`.
"""
