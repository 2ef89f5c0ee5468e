"""The engine process (no torch): the socket and its door (`operations`), the queue, the scheduler
and placement, live fan-out, the status ledger, and the workers' supervisors (local, zygote, Ray).
"""
