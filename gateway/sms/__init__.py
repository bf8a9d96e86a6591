"""The second path: SMS through a cellular modem, independent of the uplink (docs/alarms.md, "The SMS path").

``contacts`` says who to tell, ``messages`` what to say, ``policy`` (pure) when to send and when to hold back,
``queue`` keeps what is owed in SQLite, ``modem`` talks to the modem through python-gammu, and ``process`` is the
child process of the panel that runs them.
"""
