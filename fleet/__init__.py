"""A community's clustered broker (NATS with JetStream, MQTT 3.1.1) and its central inbox: a reference deployment."""
