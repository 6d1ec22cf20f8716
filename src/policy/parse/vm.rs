//! `[vm]`: the guest's name, MAC, address, gateway and MTU.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use toml::Spanned;

use super::super::model::*;
use super::super::{Located, SYNTHETIC_NET};
use super::diagnostics::Ctx;
use super::raw::RawVm;
use crate::frame::{MacAddr, GATEWAY_MAC};

pub(super) fn vm(ctx: &Ctx<'_>, raw: &RawVm) -> Option<Vm> {
    let name = ctx.keep(vm_name(ctx, &raw.name));
    let mac = ctx.keep(vm_mac(ctx, &raw.mac));
    let address = ctx.keep(vm_address(ctx, &raw.address));
    // The gateway is judged against the subnet, so only once the address is valid.
    let gateway = address.and_then(|(address, subnet)| match &raw.gateway {
        Some(g) => ctx.keep(vm_gateway(ctx, g, address, subnet)),
        None => ctx.keep(default_gateway(ctx, &raw.address, address, subnet)),
    });
    let mtu = ctx.keep(vm_mtu(ctx, raw.mtu.as_ref()));
    let (address, subnet) = address?;
    Some(Vm {
        name: name?,
        mac: mac?,
        address,
        prefix_len: subnet.prefix_len(),
        gateway: gateway?,
        mtu: mtu?,
    })
}

fn vm_name(ctx: &Ctx<'_>, raw: &Spanned<String>) -> Result<String, Located> {
    let name = raw.get_ref();
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !name_ok {
        return Err(ctx.at(
            raw,
            "vm.name",
            format!("{name:?} is not a valid VM name; use 1-63 characters of a-z, 0-9 and '-'"),
        ));
    }
    Ok(name.clone())
}

fn vm_mac(ctx: &Ctx<'_>, raw: &Spanned<String>) -> Result<MacAddr, Located> {
    let text = raw.get_ref();
    let mac: MacAddr = text.parse().map_err(|_| {
        ctx.at(
            raw,
            "vm.mac",
            format!("{text:?} is not a MAC address; write six hex bytes such as 52:54:00:12:34:56"),
        )
    })?;
    let unusable = if mac.is_multicast() {
        Some("a multicast MAC")
    } else if mac.0 == [0; 6] {
        Some("the all-zero MAC")
    } else if mac == GATEWAY_MAC {
        Some("moat's own gateway MAC")
    } else {
        None
    };
    if let Some(what) = unusable {
        return Err(ctx.at(
            raw,
            "vm.mac",
            format!("{text:?} is {what}; use a unicast address such as 52:54:00:12:34:56"),
        ));
    }
    Ok(mac)
}

/// Without `gateway`: the other host of a /30; wider subnets must name theirs (blamed on
/// `address`, whose prefix asks for it).
fn default_gateway(
    ctx: &Ctx<'_>,
    raw_address: &Spanned<String>,
    address: Ipv4Addr,
    subnet: Ipv4Net,
) -> Result<Ipv4Addr, Located> {
    let other = subnet.hosts().find(|h| *h != address);
    match other {
        Some(gw) if subnet.prefix_len() == 30 => Ok(gw),
        _ => Err(ctx.at(
            raw_address,
            "vm.gateway",
            format!(
                "required for a /{} subnet (only a /30 has an obvious gateway); add gateway = \"{}\" to [vm]",
                subnet.prefix_len(),
                other.map_or_else(|| "10.0.0.1".to_string(), |h| h.to_string())
            ),
        )),
    }
}

fn vm_mtu(ctx: &Ctx<'_>, raw: Option<&Spanned<i64>>) -> Result<u16, Located> {
    let Some(m) = raw else {
        return Ok(DEFAULT_MTU);
    };
    match u16::try_from(*m.get_ref()) {
        Ok(v) if MTU_RANGE.contains(&v) => Ok(v),
        _ => Err(ctx.at(
            m,
            "vm.mtu",
            format!(
                "{} is outside {}..={}; use 1500 unless the guest needs jumbo frames",
                m.get_ref(),
                MTU_RANGE.start(),
                MTU_RANGE.end()
            ),
        )),
    }
}

/// `vm.address`: a host address with a prefix that leaves room for the gateway.
fn vm_address(ctx: &Ctx<'_>, raw: &Spanned<String>) -> Result<(Ipv4Addr, Ipv4Net), Located> {
    let key = "vm.address";
    let text = raw.get_ref();
    let net: Ipv4Net = text.parse().map_err(|_| {
        let hint = if text.parse::<Ipv4Addr>().is_ok() {
            format!("{text:?} has no prefix; write it like {text}/30")
        } else {
            format!("{text:?} is not an IPv4 address with a prefix; write it like 10.0.0.2/30")
        };
        ctx.at(raw, key, hint)
    })?;
    if net.prefix_len() > 30 {
        return Err(ctx.at(
            raw,
            key,
            format!(
                "/{} leaves no room for the guest and its gateway; use /30 or a shorter prefix",
                net.prefix_len()
            ),
        ));
    }
    let address = net.addr();
    let subnet = net.trunc();
    let octet = address.octets()[0];
    let special = if address.is_loopback() {
        Some("a loopback address")
    } else if octet == 0 {
        Some("in 0.0.0.0/8, which is not a host address")
    } else if address.is_multicast() {
        Some("a multicast address")
    } else if octet >= 240 {
        Some("in the reserved range 240.0.0.0/4")
    } else {
        None
    };
    if let Some(what) = special {
        return Err(ctx.at(
            raw,
            key,
            format!("{address} is {what}; use a private address such as 10.0.0.2/30"),
        ));
    }
    if subnet.contains(&SYNTHETIC_NET.network()) || SYNTHETIC_NET.contains(&subnet.network()) {
        return Err(ctx.at(
            raw,
            key,
            format!(
                "{subnet} overlaps {SYNTHETIC_NET}, the pool DNS answers come from; use another subnet such as 10.0.0.0/30"
            ),
        ));
    }
    if address == subnet.network() || address == subnet.broadcast() {
        let which = if address == subnet.network() {
            "network"
        } else {
            "broadcast"
        };
        return Err(ctx.at(
            raw,
            key,
            format!("{address} is the {which} address of {subnet}; use a host address inside it"),
        ));
    }
    Ok((address, subnet))
}

fn vm_gateway(
    ctx: &Ctx<'_>,
    raw: &Spanned<String>,
    address: Ipv4Addr,
    subnet: Ipv4Net,
) -> Result<Ipv4Addr, Located> {
    let key = "vm.gateway";
    let gw: Ipv4Addr = raw.get_ref().parse().map_err(|_| {
        ctx.at(
            raw,
            key,
            format!(
                "{:?} is not an IPv4 address; write it like 10.0.0.1 (no prefix)",
                raw.get_ref()
            ),
        )
    })?;
    let problem = if !subnet.contains(&gw) {
        format!("{gw} is outside the VM's subnet {subnet}; pick a host address inside it")
    } else if gw == address {
        format!("{gw} is the guest's own address; pick another host address in {subnet}")
    } else if gw == subnet.network() {
        format!("{gw} is the network address of {subnet}; pick a host address inside it")
    } else if gw == subnet.broadcast() {
        format!("{gw} is the broadcast address of {subnet}; pick a host address inside it")
    } else {
        return Ok(gw);
    };
    Err(ctx.at(raw, key, problem))
}
