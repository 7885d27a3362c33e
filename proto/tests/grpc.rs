//! The generated gRPC code works end to end: a scripted `EngineService` on a
//! loopback port answers a generated client (unary and server-streaming
//! calls), and the embedded descriptor set describes every service with its
//! documentation, as gRPC reflection needs.

use std::time::Duration;

use anyhow::{Result, bail};
use prost::Message;
use proto::pb::engine_service_client::EngineServiceClient;
use proto::pb::engine_service_server::{EngineService, EngineServiceServer};
use proto::pb::{self, prefill_request::Prompt};
use proto::types::{Role, WorkerId};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::codegen::tokio_stream::{Iter, iter};
use tonic::{Request, Response, Status};

type Items<T> = Iter<std::vec::IntoIter<Result<T, Status>>>;

/// Holds one 10-byte KV per prefill and hands out tokens 1, 2, 3, ...
#[derive(Debug)]
struct ScriptedEngine;

fn worker() -> pb::WorkerId {
    WorkerId::new("llm", "dsv4", "prefill-0").into()
}

#[tonic::async_trait]
impl EngineService for ScriptedEngine {
    async fn prefill(
        &self,
        request: Request<pb::PrefillRequest>,
    ) -> Result<Response<pb::PrefillResponse>, Status> {
        let tokens = match request.into_inner().prompt {
            Some(Prompt::PromptLength(n)) => n,
            Some(Prompt::TokenIds(ids)) => ids.ids.len() as u32,
            None => return Err(Status::invalid_argument("prompt is required")),
        };
        Ok(Response::new(pb::PrefillResponse {
            kv: Some(pb::KvHandle {
                id: "kv-1".into(),
                prefill_worker: Some(worker()),
                kv_endpoint: "tray-0:7300".into(),
                bytes: 10,
                tokens,
                first_token: 1,
                expires_at: None,
            }),
        }))
    }

    type DecodeStream = Items<pb::DecodeChunk>;

    async fn decode(
        &self,
        request: Request<pb::DecodeRequest>,
    ) -> Result<Response<Self::DecodeStream>, Status> {
        let max = request.into_inner().max_tokens;
        let chunks = (0..max)
            .map(|i| {
                Ok(pb::DecodeChunk {
                    token_ids: vec![i + 1],
                    index: i,
                    finish_reason: if i + 1 == max {
                        pb::FinishReason::Length as i32
                    } else {
                        0
                    },
                })
            })
            .collect::<Vec<_>>();
        Ok(Response::new(iter(chunks)))
    }

    type PullKvStream = Items<pb::KvChunk>;

    async fn pull_kv(
        &self,
        request: Request<pb::PullKvRequest>,
    ) -> Result<Response<Self::PullKvStream>, Status> {
        let chunk = request.into_inner().max_chunk_bytes.max(1) as usize;
        let kv = [7u8; 10];
        let chunks = kv
            .chunks(chunk)
            .enumerate()
            .map(|(i, data)| {
                Ok(pb::KvChunk {
                    offset: (i * chunk) as u64,
                    data: data.to_vec(),
                    last: (i + 1) * chunk >= kv.len(),
                })
            })
            .collect::<Vec<_>>();
        Ok(Response::new(iter(chunks)))
    }

    async fn drain(
        &self,
        _: Request<pb::DrainRequest>,
    ) -> Result<Response<pb::DrainResponse>, Status> {
        Ok(Response::new(pb::DrainResponse {
            drained: true,
            in_flight: 0,
            kv_held: 0,
        }))
    }

    async fn status(
        &self,
        _: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::EngineStatus>, Status> {
        Ok(Response::new(pb::EngineStatus {
            worker: Some(worker()),
            role: Role::Prefill.into(),
            draining: false,
            load: Some(pb::EngineLoad {
                kv_blocks_total: 100,
                ..Default::default()
            }),
            generation: 3,
        }))
    }
}

#[tokio::test]
async fn a_generated_client_talks_to_a_generated_server() -> Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(EngineServiceServer::new(ScriptedEngine))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = stopped.await;
            }),
    );

    let mut client = EngineServiceClient::connect(address).await?;
    let deadline = Duration::from_secs(5);
    let mut prefill = Request::new(pb::PrefillRequest {
        request_id: "r1".into(),
        prompt: Some(Prompt::PromptLength(8192)),
        max_tokens: 4,
        sampling: None,
    });
    prefill.set_timeout(deadline);
    let kv = client.prefill(prefill).await?.into_inner().kv;
    let Some(kv) = kv else { bail!("no KV handle") };
    assert_eq!((kv.tokens, kv.first_token), (8192, 1));

    let mut pull = client
        .pull_kv(pb::PullKvRequest {
            kv_id: kv.id.clone(),
            max_chunk_bytes: 4,
        })
        .await?
        .into_inner();
    let mut bytes = vec![];
    while let Some(chunk) = pull.next().await {
        let chunk = chunk?;
        assert_eq!(chunk.offset as usize, bytes.len());
        bytes.extend(chunk.data);
        if chunk.last {
            break;
        }
    }
    assert_eq!(bytes.len() as u64, kv.bytes);

    let decode = pb::DecodeRequest {
        request_id: "r1".into(),
        kv: Some(kv),
        max_tokens: 4,
        sampling: None,
    };
    let chunks: Vec<_> = client.decode(decode).await?.into_inner().collect().await;
    let tokens: Vec<u32> = chunks
        .iter()
        .flat_map(|c| c.as_ref().map(|c| c.token_ids.clone()).unwrap_or_default())
        .collect();
    assert_eq!(tokens, [1, 2, 3, 4]);

    let status = client.status(pb::StatusRequest {}).await?.into_inner();
    assert_eq!(
        Role::from_wire(status.role, "EngineStatus", "role")?,
        Role::Prefill
    );
    assert!(
        client
            .drain(pb::DrainRequest { timeout: None })
            .await?
            .into_inner()
            .drained
    );

    let _ = stop.send(());
    server.await??;
    Ok(())
}

#[test]
fn the_descriptor_set_describes_every_service_with_docs() -> Result<()> {
    let set = prost_types::FileDescriptorSet::decode(proto::FILE_DESCRIPTOR_SET)?;
    let services: Vec<String> = set
        .file
        .iter()
        .filter(|f| f.package() == "rackscale.v1")
        .flat_map(|f| f.service.iter().map(|s| s.name().to_owned()))
        .collect();
    assert!(
        services.contains(&"AgentService".to_owned()),
        "{services:?}"
    );
    assert!(
        services.contains(&"EngineService".to_owned()),
        "{services:?}"
    );
    // Imports travel with it, so reflection clients can resolve Timestamp.
    assert!(
        set.file
            .iter()
            .any(|f| f.name() == "google/protobuf/timestamp.proto")
    );
    // Comments are kept (source info), so reflection shows documentation.
    let engine = set
        .file
        .iter()
        .find(|f| f.name() == "rackscale/v1/engine.proto");
    let documented = engine
        .and_then(|f| f.source_code_info.as_ref())
        .is_some_and(|info| {
            info.location
                .iter()
                .any(|l| l.leading_comments().contains("KV"))
        });
    assert!(documented, "engine.proto lost its comments");
    Ok(())
}

#[test]
fn every_message_field_enum_and_method_is_documented() -> Result<()> {
    let set = prost_types::FileDescriptorSet::decode(proto::FILE_DESCRIPTOR_SET)?;
    let mut undocumented = vec![];
    for file in set.file.iter().filter(|f| f.package() == "rackscale.v1") {
        let documented: std::collections::HashSet<Vec<i32>> = file
            .source_code_info
            .iter()
            .flat_map(|info| &info.location)
            .filter(|l| !l.leading_comments().trim().is_empty())
            .map(|l| l.path.clone())
            .collect();
        let mut check = |path: Vec<i32>, what: String| {
            if !documented.contains(&path) {
                undocumented.push(format!("{}: {what}", file.name()));
            }
        };
        // Descriptor field numbers: message_type = 4, field = 2, enum_type = 5,
        // value = 2, service = 6, method = 2.
        for (i, message) in file.message_type.iter().enumerate() {
            let i = i as i32;
            check(vec![4, i], message.name().to_owned());
            for (j, field) in message.field.iter().enumerate() {
                check(
                    vec![4, i, 2, j as i32],
                    format!("{}.{}", message.name(), field.name()),
                );
            }
        }
        for (i, enumeration) in file.enum_type.iter().enumerate() {
            let i = i as i32;
            check(vec![5, i], enumeration.name().to_owned());
            for (j, value) in enumeration.value.iter().enumerate() {
                check(vec![5, i, 2, j as i32], value.name().to_owned());
            }
        }
        for (i, service) in file.service.iter().enumerate() {
            let i = i as i32;
            check(vec![6, i], service.name().to_owned());
            for (j, method) in service.method.iter().enumerate() {
                check(
                    vec![6, i, 2, j as i32],
                    format!("{}.{}", service.name(), method.name()),
                );
            }
        }
    }
    assert!(undocumented.is_empty(), "undocumented: {undocumented:#?}");
    Ok(())
}
