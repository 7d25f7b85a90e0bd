# The host the addon runs on: processes it starts (and, as they move here, locks and files).
