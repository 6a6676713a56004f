"""The one-command lifecycle (`lmforge run`): every stage in one run directory, resumable.

    layout.py     where each artefact of a run lives
    records.py    stage records (inputs hash, outputs, timings) in RUN/stages.json
    stage.py      what a stage declares and is given, and the time budget's split
    config.py     the `run` section (alignment method, exports, evaluation, budget shares)
    run.py        the stages up to pre-training, the table of all stages, and the driver
    posttrain.py  the stages after pre-training: sft, align, eval, chat, export
    cli.py        the `lmforge run` command
"""
