"""`downpour simulate`: a run of `downpour train` predicted by a calibrated discrete-event model.

    profile.py    the costs the model uses (a profile measured on this machine with
                  --calibrate, or flags for another), each with its unit and source
    engine.py     the discrete-event simulation of one run's protocol
    validate.py   the grid of real emulated runs the predictions are held to
    command.py    the command line: simulate, --calibrate, --explain, --validate, --json
"""
