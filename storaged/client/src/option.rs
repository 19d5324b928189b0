//! The handshake's options as the server reads them: one decoder from an option's number and
//! data to what it asks for, so that the server (and the fuzzer) judge every option's bytes in
//! one place. The layouts are in [`crate::protocol`] and [`crate::meta`].

use crate::meta::{MetaContextOption, NBD_OPT_LIST_META_CONTEXT, NBD_OPT_SET_META_CONTEXT};
use crate::protocol::*;

/// An option a client sent, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    /// `NBD_OPT_EXPORT_NAME`: enter transmission on this export (empty: the default export).
    ExportName(String),
    /// `NBD_OPT_ABORT` (any data is ignored).
    Abort,
    /// `NBD_OPT_LIST`.
    List,
    /// `NBD_OPT_STARTTLS`.
    StartTls,
    /// `NBD_OPT_INFO`.
    Info(GoOption),
    /// `NBD_OPT_GO`.
    Go(GoOption),
    /// `NBD_OPT_STRUCTURED_REPLY`.
    StructuredReply,
    /// `NBD_OPT_LIST_META_CONTEXT`.
    ListMetaContext(MetaContextOption),
    /// `NBD_OPT_SET_META_CONTEXT`.
    SetMetaContext(MetaContextOption),
    /// The project's [`NBD_OPT_LEASE`].
    Lease(LeaseOption),
    /// An option this server does not serve (`NBD_REP_ERR_UNSUP`).
    Unsupported(u32),
}

impl ClientOption {
    /// Decodes option `option` with `data` (already bounded by [`MAX_OPTION_LEN`]). An error
    /// is answered with `NBD_REP_ERR_INVALID`, except for `NBD_OPT_EXPORT_NAME`, which has no
    /// error reply (the server disconnects).
    pub fn decode(option: u32, data: &[u8]) -> Result<ClientOption, ProtocolError> {
        let empty = |o: ClientOption| {
            if data.is_empty() {
                Ok(o)
            } else {
                Err(ProtocolError::Invalid("no data expected"))
            }
        };
        match option {
            NBD_OPT_EXPORT_NAME => match std::str::from_utf8(data) {
                Ok(name) => Ok(ClientOption::ExportName(name.to_string())),
                Err(_) => Err(ProtocolError::Invalid("string is not UTF-8")),
            },
            NBD_OPT_ABORT => Ok(ClientOption::Abort),
            NBD_OPT_LIST => empty(ClientOption::List),
            NBD_OPT_STARTTLS => empty(ClientOption::StartTls),
            NBD_OPT_STRUCTURED_REPLY => empty(ClientOption::StructuredReply),
            NBD_OPT_INFO => GoOption::decode(data).map(ClientOption::Info),
            NBD_OPT_GO => GoOption::decode(data).map(ClientOption::Go),
            NBD_OPT_LIST_META_CONTEXT => {
                MetaContextOption::decode(data).map(ClientOption::ListMetaContext)
            }
            NBD_OPT_SET_META_CONTEXT => {
                MetaContextOption::decode(data).map(ClientOption::SetMetaContext)
            }
            NBD_OPT_LEASE => LeaseOption::decode(data).map(ClientOption::Lease),
            other => Ok(ClientOption::Unsupported(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_decode_by_number() {
        let go = GoOption {
            name: "v".into(),
            info: vec![NBD_INFO_NAME],
        };
        let d = |o, data: &[u8]| ClientOption::decode(o, data);
        assert_eq!(
            d(NBD_OPT_GO, &go.encode()),
            Ok(ClientOption::Go(go.clone()))
        );
        assert_eq!(d(NBD_OPT_INFO, &go.encode()), Ok(ClientOption::Info(go)));
        assert_eq!(
            d(NBD_OPT_EXPORT_NAME, b"v"),
            Ok(ClientOption::ExportName("v".into()))
        );
        assert!(d(NBD_OPT_EXPORT_NAME, &[0xff]).is_err());
        assert_eq!(d(NBD_OPT_ABORT, b"x"), Ok(ClientOption::Abort));
        assert!(d(NBD_OPT_STRUCTURED_REPLY, b"x").is_err());
        assert!(d(NBD_OPT_LIST, b"x").is_err());
        assert_eq!(d(0x77, b"abc"), Ok(ClientOption::Unsupported(0x77)));
        assert!(d(NBD_OPT_SET_META_CONTEXT, &[0, 0, 0]).is_err());
    }
}
