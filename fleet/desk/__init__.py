"""The duty desk: a web page for the community's duty officer (fleet/desk/app.py), and the acknowledgement links."""
