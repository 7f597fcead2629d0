"""AWS backends: SQS queue, DynamoDB task store, S3 blob store. Needs the ``aws`` extra (boto3)."""
