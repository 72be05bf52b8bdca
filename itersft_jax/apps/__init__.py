"""Applications on top of the library: the `itersft` command and its demos.
"""
