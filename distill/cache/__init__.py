"""distill-cache: the teacher run once over a dataset, its sparse distribution written as Parquet parts beside the data;
two orchestrators (a Beam pipeline, the ranks of a launcher) around one function that writes a part."""
