"""The training objective: losses by name, chunked logit losses, sparse (cached-teacher) logit losses."""
