"""distill-cache: the Beam pipeline that runs the teacher once over a dataset, and its command line."""
