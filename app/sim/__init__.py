"""`downpour simulate`: a run of `downpour train` predicted by a calibrated discrete-event model.

    profile.py    the costs the model uses (a profile measured on this machine with
                  --calibrate, or flags for another), each with its unit and source
    calibrate.py  the measurements behind a profile
    network.py    the discrete-event machinery: simulated time, links, connections
    engine.py     the discrete-event simulation of one run's protocol
    linkprobe.py  what share of its rate an emulated link carries where tbf drops
    validate.py   the grid of real emulated runs the predictions are held to
    command.py    the command line: simulate, --calibrate, --explain, --validate, --json
"""
