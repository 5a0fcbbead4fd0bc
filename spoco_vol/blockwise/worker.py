"""Set-up of the dask worker processes spoco-vol starts on this machine (a distributed
preload, ``preload=["spoco_vol.blockwise.worker"]``)."""
import logging
import signal


def dask_setup(worker) -> None:
    # Ctrl-C in a terminal reaches the whole process group. The client stops the run and
    # shuts the cluster down; a worker that handled SIGINT itself would print a traceback
    # of its own (dozens of lines per worker) and die before it is asked to.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A stopped run cancels the block tasks still running; the state machine then warns
    # for each that it "ended with CancelledError", which is what cancelling means.
    logging.getLogger("distributed.worker.state_machine").setLevel(logging.ERROR)
