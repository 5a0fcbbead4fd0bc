"""Set-up of the dask worker processes spoco-vol starts on this machine (a distributed
preload, ``preload=["spoco_vol.blockwise.worker"]``)."""
import logging
import signal
import weakref

HEARTBEAT_FAILURE = "Failed to communicate with scheduler during heartbeat"


def dask_setup(worker) -> None:
    # Ctrl-C in a terminal reaches the whole process group. The client stops the run and
    # shuts the cluster down; a worker that handled SIGINT itself would print a traceback
    # of its own (dozens of lines per worker) and die before it is asked to.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A stopped run cancels the block tasks still running; the state machine then warns
    # for each that it "ended with CancelledError", which is what cancelling means.
    logging.getLogger("distributed.worker.state_machine").setLevel(logging.ERROR)
    quiet_heartbeat_at_close(worker)


def quiet_heartbeat_at_close(worker) -> logging.Filter:
    """Drop the worker's "Failed to communicate with scheduler during heartbeat" error
    while it closes. Worker.close stops the heartbeat's periodic callback but not a
    heartbeat already waiting for the scheduler's answer, then closes its connections under
    it: at the end of a finished run that prints a traceback of an error that is not one
    (dask/distributed #9032). While the worker runs, the error is still logged."""
    from distributed.core import Status
    closing = {Status.closing, Status.closing_gracefully, Status.closed}
    ref = weakref.ref(worker)

    class HeartbeatAtClose(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            w = ref()
            return not (w is not None and w.status in closing and record.getMessage().startswith(HEARTBEAT_FAILURE))
    found = HeartbeatAtClose()
    logging.getLogger("distributed.worker").addFilter(found)
    return found
