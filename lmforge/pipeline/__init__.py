"""The one-command pipeline (`lmforge run`): every stage in one run directory, resumable.

    layout.py   where each artefact of a run lives
    records.py  stage records (inputs hash, outputs, timings) in RUN/stages.json
    run.py      the stages and the driver that skips, continues or reruns them
    cli.py      the `lmforge run` command
"""
