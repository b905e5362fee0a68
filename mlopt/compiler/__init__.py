"""The compiler: ingest (source -> Model), passes (Model -> Model), validation, measurement, pipeline."""
