# The host the addon runs on: the processes it starts, its time limits, file locks, private folders.
