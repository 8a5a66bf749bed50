#!/bin/sh
# Bootstrap MinIO for the stack (idempotent; run by the `minio-init` service with the mc client):
#   1. the buckets for MLflow artifacts and the DVC remote;
#   2. the S3 service user (AWS_ACCESS_KEY_ID) that MLflow, DVC and the workers use, with
#      read/write on those two buckets only (the root login stays with the administrator).
# Every input comes from the environment; nothing is printed that holds a secret.
set -eu

: "${MINIO_ENDPOINT:=http://minio:9000}"
: "${MINIO_ROOT_USER:?MINIO_ROOT_USER is not set}"
: "${MINIO_ROOT_PASSWORD:?MINIO_ROOT_PASSWORD is not set}"
: "${MLFLOW_ARTIFACTS_BUCKET:?MLFLOW_ARTIFACTS_BUCKET is not set}"
: "${DVC_REMOTE_BUCKET:?DVC_REMOTE_BUCKET is not set}"
: "${AWS_ACCESS_KEY_ID:?AWS_ACCESS_KEY_ID is not set}"
: "${AWS_SECRET_ACCESS_KEY:?AWS_SECRET_ACCESS_KEY is not set}"
POLICY=rlhf-readwrite
ALIAS=stack

mc alias set "$ALIAS" "$MINIO_ENDPOINT" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null

for bucket in "$MLFLOW_ARTIFACTS_BUCKET" "$DVC_REMOTE_BUCKET"; do
  mc mb --ignore-existing "$ALIAS/$bucket"
done

if [ "$AWS_ACCESS_KEY_ID" = "$MINIO_ROOT_USER" ]; then
  echo "[minio-init] AWS_ACCESS_KEY_ID is the root user: no service user created (local use only)"
  exit 0
fi

policy_file="$(mktemp)"
trap 'rm -f "$policy_file"' EXIT
cat >"$policy_file" <<EOF
{
  "Version": "2012-10-17",
  "Statement": [
    {
      "Effect": "Allow",
      "Action": ["s3:GetBucketLocation", "s3:ListBucket", "s3:ListBucketMultipartUploads"],
      "Resource": ["arn:aws:s3:::${MLFLOW_ARTIFACTS_BUCKET}", "arn:aws:s3:::${DVC_REMOTE_BUCKET}"]
    },
    {
      "Effect": "Allow",
      "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject",
                 "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"],
      "Resource": ["arn:aws:s3:::${MLFLOW_ARTIFACTS_BUCKET}/*", "arn:aws:s3:::${DVC_REMOTE_BUCKET}/*"]
    }
  ]
}
EOF

# `policy create` replaces a policy of the same name; `user add` resets an existing user's secret.
mc admin policy create "$ALIAS" "$POLICY" "$policy_file"
mc admin user add "$ALIAS" "$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY"
# Attaching a policy that is already attached is an error in mc, so look first
# (policyName in the JSON is a comma-separated list).
if mc admin user info "$ALIAS" "$AWS_ACCESS_KEY_ID" --json | grep -q "[\",]$POLICY[\",]"; then
  echo "[minio-init] policy $POLICY already attached to $AWS_ACCESS_KEY_ID"
else
  mc admin policy attach "$ALIAS" "$POLICY" --user "$AWS_ACCESS_KEY_ID"
fi
echo "[minio-init] buckets $MLFLOW_ARTIFACTS_BUCKET and $DVC_REMOTE_BUCKET ready for $AWS_ACCESS_KEY_ID"
