"""The wire: the JSON-lines protocol between clients, the engine and its workers, and the async client.
"""
