//! The racks `rackscale up` simulates, from `--topology`: a comma-separated
//! list of `[NAME=]SKU[:TRAYSxGPUS]`, e.g. `gb300,gb200` (one GB300 NVL72
//! and one GB200 NVL72 rack: 18 trays of 4 GPUs each) or
//! `a=gb200:4x4,b=gb300:18x4`. Pure parsing into the harness's
//! [`harness::Topology`], which also names the agents' nodes and cliques.

use anyhow::{Context, Result, bail};
use harness::{Sku, Topology};

/// One GB200 / GB300 NVL72 rack: 18 compute trays of 4 GPUs.
const NVL72: (u32, u32) = (18, 4);

fn sku(text: &str) -> Result<Sku> {
    match text.to_ascii_lowercase().as_str() {
        "gb200" => Ok(Sku::Gb200),
        "gb300" => Ok(Sku::Gb300),
        other => bail!("unknown rack SKU {other:?}: use gb200 or gb300"),
    }
}

fn shape(text: &str) -> Result<(u32, u32)> {
    let (trays, gpus) = text
        .split_once('x')
        .with_context(|| format!("rack shape {text:?} is not TRAYSxGPUS, e.g. 18x4"))?;
    let trays: u32 = trays
        .parse()
        .with_context(|| format!("tray count {trays:?} in {text:?}"))?;
    let gpus: u32 = gpus
        .parse()
        .with_context(|| format!("GPUs per tray {gpus:?} in {text:?}"))?;
    if !(1..=18).contains(&trays) || !(1..=8).contains(&gpus) || trays * gpus > 72 {
        bail!("rack shape {text}: 1-18 trays of 1-8 GPUs, at most 72 GPUs (one NVLink domain)");
    }
    Ok((trays, gpus))
}

/// Parses `--topology`.
pub fn parse(text: &str) -> Result<Topology> {
    let mut topology = Topology::new();
    let mut names: Vec<String> = Vec::new();
    for (i, item) in text.split(',').map(str::trim).enumerate() {
        if item.is_empty() {
            bail!("--topology {text:?}: empty rack entry");
        }
        let (name, rest) = match item.split_once('=') {
            Some((n, r)) => (n.trim().to_string(), r.trim()),
            None => (String::new(), item),
        };
        let (sku_text, shape_text) = match rest.split_once(':') {
            Some((s, sh)) => (s, Some(sh)),
            None => (rest, None),
        };
        let sku = sku(sku_text)?;
        let (trays, gpus) = match shape_text {
            Some(s) => shape(s)?,
            None => NVL72,
        };
        let name = if name.is_empty() {
            format!(
                "{}-{}",
                sku_text.to_ascii_lowercase(),
                (b'a' + i as u8) as char
            )
        } else {
            name
        };
        if !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            bail!("rack name {name:?}: use lowercase letters, digits and '-'");
        }
        if names.contains(&name) {
            bail!("rack name {name:?} appears twice in --topology");
        }
        names.push(name.clone());
        topology = topology.rack(&name, sku, trays, gpus);
    }
    Ok(topology)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_one_nvl72_rack_of_each_sku() {
        let t = parse("gb300,gb200").unwrap();
        let racks = t.racks();
        assert_eq!(racks.len(), 2);
        assert_eq!(racks[0].gpus(), 72);
        assert_eq!(racks[1].sku, Sku::Gb200);
        assert_eq!(racks[0].node_names().len(), 18);
    }

    #[test]
    fn names_and_shapes_are_checked() {
        let t = parse("small=gb200:4x4").unwrap();
        assert_eq!(t.racks()[0].gpus(), 16);
        assert!(
            parse("h100")
                .unwrap_err()
                .to_string()
                .contains("unknown rack SKU")
        );
        assert!(
            parse("gb200:20x4")
                .unwrap_err()
                .to_string()
                .contains("at most 72")
        );
        assert!(
            parse("a=gb200,a=gb300")
                .unwrap_err()
                .to_string()
                .contains("twice")
        );
        assert!(
            parse("gb200:4")
                .unwrap_err()
                .to_string()
                .contains("TRAYSxGPUS")
        );
    }
}
