"""Test and drill tooling that ships with the package but is never imported by the product code:
``s3_fault_proxy`` (fault injection in front of any S3 endpoint, used by tests/faults and by fault
drills against a real cluster's object store: ``python -m sar_scale.testing.s3_fault_proxy``)."""
