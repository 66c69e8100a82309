"""The front process: one uvloop event loop running the HTTP apps over the supervisor's workers."""
