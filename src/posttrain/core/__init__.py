"""The foundation every layer stands on: errors, the cache directory, weight files, the sandbox, recipe sections."""
