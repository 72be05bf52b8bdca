"""Meshes, several processes, and the sharding rule table.
"""
