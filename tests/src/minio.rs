//! A real MinIO server on loopback, one per test so a test may stop and
//! restart it, with an aws-sdk-s3 client pointed at it.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::Client;

use crate::process::{free_port, Process};
use crate::scratch_dir;
use crate::servers::server_bin;
use crate::wait::wait_for;

pub const ACCESS_KEY: &str = "localship";
pub const SECRET_KEY: &str = "localship-secret";
pub const REGION: &str = "us-east-1";

pub struct Minio {
    dir: PathBuf,
    address: Ipv4Addr,
    port: u16,
    process: Option<Process>,
}

impl Minio {
    /// Starts MinIO with a fresh data directory and waits until it answers S3.
    pub async fn start() -> Result<Self> {
        Self::start_on(Ipv4Addr::LOCALHOST).await
    }

    /// Like [`start`](Self::start), listening on `address` (a bridge address
    /// a real node's pods reach) instead of loopback.
    pub async fn start_on(address: Ipv4Addr) -> Result<Self> {
        let mut minio = Self {
            dir: scratch_dir("minio")?,
            address,
            port: free_port(),
            process: None,
        };
        minio.resume().await?;
        Ok(minio)
    }

    /// `http://<address>:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://{}:{}", self.address, self.port)
    }

    /// Environment for a process that should reach this MinIO through the
    /// standard AWS credential chain.
    pub fn aws_env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID".into(), ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY".into(), SECRET_KEY.into()),
            ("AWS_REGION".into(), REGION.into()),
            ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
        ]
    }

    /// The server's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Process::pid)
    }

    pub fn data_dir(&self) -> &Path {
        &self.dir
    }

    /// Stops the server (SIGKILL), keeping its data, as an outage would.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill();
        }
    }

    /// Starts the server again on the same port and data.
    pub async fn resume(&mut self) -> Result<()> {
        let data = self.dir.join("data");
        std::fs::create_dir_all(&data)?;
        let args = vec![
            "server".to_string(),
            data.display().to_string(),
            format!("--address={}:{}", self.address, self.port),
            format!("--console-address={}:{}", self.address, free_port()),
            "--quiet".into(),
        ];
        let envs = vec![
            ("MINIO_ROOT_USER".to_string(), ACCESS_KEY.to_string()),
            ("MINIO_ROOT_PASSWORD".to_string(), SECRET_KEY.to_string()),
            ("MINIO_BROWSER".to_string(), "off".to_string()),
            ("MINIO_UPDATE".to_string(), "off".to_string()),
            ("MINIO_CALLHOME_ENABLE".to_string(), "off".to_string()),
            // Lets tests count S3 requests from the server's own metrics.
            (
                "MINIO_PROMETHEUS_AUTH_TYPE".to_string(),
                "public".to_string(),
            ),
        ];
        let process = Process::spawn("minio", &server_bin("minio")?, &args, &envs, &self.dir)?;
        self.process = Some(process);
        let client = self.client();
        // A server that died shows up as the timeout, with its log tail.
        wait_for(
            "MinIO to answer ListBuckets",
            Duration::from_secs(60),
            || async { Ok(client.list_buckets().send().await.ok().map(|_| ())) },
        )
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "{e:#}\nlast lines of minio.log:\n{}",
                crate::process::log_tail(&self.dir.join("minio.log"), 30)
            )
        })
    }

    /// S3 requests this server has answered so far, of every API, from its
    /// own Prometheus counters.
    pub fn s3_requests(&self) -> Result<u64> {
        // The v3 endpoint is current; v2's counters are cached for seconds.
        let (code, body) =
            crate::agents::http_get_at(self.address, self.port, "/minio/metrics/v3/api/requests")?;
        anyhow::ensure!(code == 200, "MinIO metrics answered {code}");
        Ok(body
            .lines()
            .filter(|l| l.starts_with("minio_api_requests_total{") && l.contains(r#"type="s3""#))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64)
    }

    /// An S3 client using path-style addressing against this server.
    pub fn client(&self) -> Client {
        let config = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(REGION))
            .endpoint_url(self.endpoint())
            .force_path_style(true)
            .credentials_provider(Credentials::new(ACCESS_KEY, SECRET_KEY, None, None, "test"))
            .build();
        Client::from_conf(config)
    }

    pub async fn create_bucket(&self, bucket: &str) -> Result<()> {
        self.client()
            .create_bucket()
            .bucket(bucket)
            .send()
            .await
            .with_context(|| format!("create bucket {bucket}"))?;
        Ok(())
    }

    pub async fn put_object(&self, bucket: &str, key: &str, body: Vec<u8>) -> Result<()> {
        self.client()
            .put_object()
            .bucket(bucket)
            .key(key)
            .body(ByteStream::from(body))
            .send()
            .await
            .with_context(|| format!("put s3://{bucket}/{key}"))?;
        Ok(())
    }

    /// The object's bytes, or `None` if there is no such key.
    pub async fn get_object(&self, bucket: &str, key: &str) -> Result<Option<Vec<u8>>> {
        match self
            .client()
            .get_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
        {
            Ok(out) => Ok(Some(out.body.collect().await?.into_bytes().to_vec())),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("get s3://{bucket}/{key}")),
        }
    }

    /// What Airflow's S3 reader finds for the log under `key`: every object whose key starts
    /// with it, in key order, one after the other; `None` when there is none. A log shipped
    /// by one writer is one object, under its own key or under a side key until final.
    pub async fn log_view(&self, bucket: &str, key: &str) -> Result<Option<Vec<u8>>> {
        let keys: Vec<String> = self
            .list_keys(bucket)
            .await?
            .into_iter()
            .filter(|k| k.starts_with(key))
            .collect();
        if keys.is_empty() {
            return Ok(None);
        }
        let mut view = Vec::new();
        for key in keys {
            view.extend(self.get_object(bucket, &key).await?.unwrap_or_default());
        }
        Ok(Some(view))
    }

    /// Every key in the bucket, sorted.
    pub async fn list_keys(&self, bucket: &str) -> Result<Vec<String>> {
        let mut keys = Vec::new();
        let mut pages = self
            .client()
            .list_objects_v2()
            .bucket(bucket)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.with_context(|| format!("list s3://{bucket}"))?;
            keys.extend(
                page.contents()
                    .iter()
                    .filter_map(|o| o.key().map(String::from)),
            );
        }
        keys.sort();
        Ok(keys)
    }
}
