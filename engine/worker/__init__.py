"""The worker process (torch): its main loop, the job kinds it runs, a job's context, sweeps and
the study's experiments.
"""
