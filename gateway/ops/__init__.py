"""The technician's side: ``gatewayctl`` (a client of the control socket and a reader of the site's files),
``doctor`` and the shell completion and man page. Nothing here runs inside the daemon; what serves these
tools there is :mod:`gateway.control`."""
