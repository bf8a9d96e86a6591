"""What runs inside the panel process for operators: the one command handler (MQTT, the control socket and the
duty desk all come through it), the control socket that serves it to ``gatewayctl``, and the controller
discovery a scan uses. The technician's own side, ``gatewayctl`` and ``doctor``, is :mod:`gateway.ops`."""
