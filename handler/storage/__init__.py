"""Where images go: the outputs layout (keys, URLs) and the storage backends (local folder, mount, OSS).
"""
