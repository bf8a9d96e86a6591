"""Device drivers: one small interface for Modbus, GPIO and simulated devices."""
