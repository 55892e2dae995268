"""Challenge front ends: folder, exec and invoke modes (what the container's entrypoint runs).

=============  ===================================================================================
module         owns
=============  ===================================================================================
``settings``   :class:`ChallengeSettings`, loading the weights once, output checks
``folder``     folder mode: every volume in ``/input`` -> same name and format in ``/output``
``exec``       exec mode (Grand Challenge 2024/2025): ``/input/images/<slug>/`` -> ``output.mha``
``invoke``     invoke mode (Grand Challenge 2026): ``inputs.json`` -> the case, through ``server``
``server``     the HTTP server of the invoke API (standard library; knows nothing of the modes)
``runner``     mode dispatch, SIGTERM, exit codes, ``lsmseg challenge`` / ``lsmseg serve``
=============  ===================================================================================

Imports run one way (runner -> modes -> settings; invoke -> server), so there is no cycle.
``python -m lsmseg.challenge [OPTIONS]`` is ``lsmseg challenge [OPTIONS]``.
"""
