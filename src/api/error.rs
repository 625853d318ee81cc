//! API errors: every failure the CPH API answers, mapped to its HTTP status and
//! `CPS.xxxx` code in one exhaustive match, and rendered as
//! `{"error_code", "error_msg", "request_id"}`.

use axum::http::StatusCode;

/// A failure answered to an API caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error("invalid request body: {0}")]
    BadBody(String),
    /// A body whose field `name` is missing or of the wrong type: the
    /// reference's code for that parameter.
    #[error("parameter: {name} is invalid: {detail}")]
    BadField {
        name: String,
        code: &'static str,
        detail: String,
    },
    #[error("request body exceeds the limit")]
    BodyTooLarge,
    #[error("parameter: offset or limit is invalid")]
    OffsetLimit,
    #[error("service internal error: {0}")]
    Internal(String),
    #[error("parameter: {0} is invalid")]
    InvalidPhoneId(String),
    #[error("phone {0} is not found")]
    PhoneNotFound(String),
    #[error("parameter: phone_id list is empty")]
    PhoneIdsEmpty,
    #[error("parameter: status is invalid")]
    Status,
    #[error("job {0} not found")]
    JobNotFound(String),
    #[error("server {0} not found")]
    ServerNotFound(String),
    #[error("parameter: server_id is invalid")]
    InvalidServerId,
    #[error("parameter: count is invalid")]
    Count,
    #[error("parameter: phone_name is invalid")]
    PhoneName,
    #[error("parameter: phone_model_name is invalid")]
    PhoneModelName,
    #[error("parameter: image_id is invalid")]
    ImageId,
    #[error("parameter: band_width is invalid")]
    BandWidth,
    #[error("parameter: band_width_id is invalid")]
    BandWidthId,
    #[error("parameter: band_width_share_type is invalid")]
    BandWidthShareType,
    #[error("parameter: band_width_size is invalid")]
    BandWidthSize,
    #[error("parameter: ports is invalid")]
    Ports,
    #[error("parameter: port name is invalid")]
    PortName,
    #[error("parameter: port name is conflicted")]
    PortNameConflict,
    #[error("parameter: listen_port is invalid")]
    ListenPort,
    #[error("parameter: listen_port is conflicted")]
    ListenPortConflict,
    #[error("parameter: request_id is empty")]
    RequestIdEmpty,
    #[error("parameter: request_id {0} is invalid")]
    RequestIdInvalid(String),
    #[error("jobs related to this request id are not found")]
    RequestJobsNotFound,
    #[error("parameter: extend_param is invalid")]
    ExtendParam,
    #[error("parameter: charging_mode is invalid")]
    ChargingMode,
    #[error("parameter: period_type is invalid")]
    PeriodType,
    #[error("parameter: period_num is invalid")]
    PeriodNum,
    #[error("parameter: isAutoRenew is invalid")]
    AutoRenew,
    #[error("parameter: isAutoPay is invalid")]
    AutoPay,
    #[error("capacity exceeded for server model {0}")]
    Capacity(String),
    #[error("parameter: keypair_name is empty")]
    KeypairEmpty,
    #[error("keypair {0} could not be found")]
    KeypairNotFound(String),
    #[error("parameter: property is invalid: {0}")]
    Property(String),
    #[error("parameter: {0}")]
    PropertyUnsupported(String),
    /// A value an attribute's rule refuses, with the attribute's code.
    #[error("parameter: {1}")]
    PropertyInvalid(&'static str, String),
    #[error("parameter: phone_ids is invalid")]
    PhoneIds,
    #[error("parameter: server_name is invalid")]
    ServerName,
    #[error("parameter: server_model_name is invalid")]
    ServerModelName,
    #[error("parameter: internet_accessible is empty")]
    InternetAccessible,
    #[error("parameter: server_ids is invalid")]
    ServerIds,
    #[error("parameter: server_ids is empty")]
    ServerIdsEmpty,
    #[error("band width {0} not found")]
    BandWidthNotFound(String),
    #[error("parameter: command is invalid")]
    Command,
    #[error("parameter: content is invalid")]
    Content,
    #[error("parameter: filename doesn't end .apk")]
    NotApk,
    #[error("parameter: encode server id is invalid")]
    EncodeServerId,
    #[error("parameter: bucket_name is invalid")]
    BucketName,
    #[error("parameter: object_path is invalid")]
    ObjectPath,
    #[error("phone {0} is not in running status")]
    PhoneNotRunning(String),
    #[error("parameter: image_label is invalid")]
    ImageLabel,
    #[error("scheduled event {0} not found")]
    EventNotFound(String),
    #[error("scheduled event {0} is {1}: {2}")]
    EventState(String, String, &'static str),
    #[error("parameter: {0}")]
    EventParam(String),
    #[error("the server's status does not allow it: {0}")]
    ServerState(String),
    #[error("the server's model cannot change: {0}")]
    ModelChangeRefused(String),
    #[error("server model is not supported: {0}")]
    ServerModelUnsupported(String),
    #[error("phone model {0} is not supported: {1}")]
    PhoneModelUnsupported(String, String),
    #[error("image {image_id} is a {image_label} image; phone model {phone_model} runs {model_label} images")]
    ImageModelMismatch {
        image_id: String,
        image_label: String,
        phone_model: String,
        model_label: String,
    },
    #[error("parameter: ports exceeds the limit")]
    PortsLimit,
    #[error("the file_paths is invalid")]
    FilePaths,
    #[error("only the size of shared bandwidth can be changed")]
    OnlySharedBandwidth,
    #[error("parameter: the number of request IDs has exceeded the limit")]
    TooManyRequestIds,
    #[error("phone image {0} not found")]
    ImageNotFound(String),
    #[error("parameter: storage_infos is invalid")]
    StorageInfos,
    #[error("parameter: storage_infos exceeds the limit")]
    StorageInfosLimit,
    #[error("parameter: include_files is invalid")]
    IncludeFiles,
    #[error("parameter: exclude_files is invalid")]
    ExcludeFiles,
    #[error("parameter: restore_infos is invalid")]
    RestoreInfos,
    #[error("parameter: package_name is invalid")]
    PackageName,
    #[error("the path is invalid")]
    Path,
    #[error("parameter: traffic type is invalid")]
    TrafficType,
    #[error("parameter: the number of requested phone ids has exceeded the limit")]
    TooManyPhoneIds,
    #[error("source phone and target phone can not be the same")]
    SamePhone,
    #[error("parameter: migrate_infos is invalid")]
    MigrateInfos,
    #[error("parameter: source_phone_id is invalid: phone {0} not found")]
    SourcePhone(String),
    #[error("parameter: target_phone_id is invalid: phone {0} not found")]
    TargetPhone(String),
    #[error("parameter: network_version is invalid")]
    NetworkVersion,
    #[error("insufficient bms quantity for server model {0}")]
    InsufficientBms(String),
    #[error("server model {0} not found")]
    ServerModelNotFound(String),
    #[error("the server specifications cannot be the same as the specifications to be modified")]
    SameModel,
    #[error("too many synchronous commands, at most 6 per minute")]
    SyncShellRate,
    #[error("the requested resource does not exist")]
    NotFound,
    #[error("no permission to request resources")]
    Forbidden,
    #[error("authentication failed: {0}")]
    Unauthorized(String),
    #[error("encode server {0} not found")]
    EncodeServerNotFound(String),
    #[error("parameter: {0} is invalid")]
    Field(&'static str),
    #[error("phone {0} has no mapped port to connect to")]
    NoAccessPort(String),
    #[error("parameter: type is invalid")]
    Type,
    #[error("parameter: is_public is invalid")]
    IsPublic,
    #[error("parameter: product_type is invalid")]
    ProductType,
    #[error("parameter: encode server id list is invalid")]
    EncodeServerIds,
    #[error("parameter: pre_install_app is invalid")]
    PreInstallApp,
    #[error("server {0} is being deleted")]
    ServerDeleting(String),
    #[error("server {0} is being created; delete it once it is created")]
    ServerCreating(String),
    #[error("parameter: server_ids holds more than {0} servers")]
    TooManyServerIds(usize),
    #[error("parameter: invalid resource type {0}")]
    TagResourceType(String),
    #[error("parameter: invalid resource id")]
    TagResourceId,
    #[error("the resource_id {0} is not found")]
    TagResourceNotFound(String),
    #[error("parameter: invalid tags: {0}")]
    Tags(&'static str),
    #[error("parameter: invalid tag key {0:?}")]
    TagKey(String),
    #[error("parameter: invalid tag value {0:?}")]
    TagValue(String),
    #[error("parameter: key {0:?} starts with _sys_, which is reserved to the system")]
    TagKeyReserved(String),
    #[error("parameter: a resource holds at most {0} tags")]
    TooManyTags(usize),
    #[error("parameter: invalid match key {0:?}; only resource_name is supported")]
    MatchKey(String),
    #[error("parameter: invalid match value")]
    MatchValue,
    #[error("parameter: invalid tag values of key {0:?}")]
    TagValues(String),
    #[error("parameter: image_name is invalid")]
    ImageName,
    #[error("phone image {0} is not active")]
    ImageNotActive(String),
    #[error("phone {0} must be running or stopped to make an image of it")]
    PhoneNotSettled(String),
    #[error("image {0} is shared with {1} projects already")]
    TooManyMembers(String, usize),
    #[error("server {0} does not support share files: its phone flavor has no shared storage (max_share_disk_size_g)")]
    ShareFilesUnsupported(String),
    #[error("server {0} does not support share apps: its phone flavor has no sharepool (sharepool_size_g)")]
    ShareAppsUnsupported(String),
}

impl ApiError {
    /// HTTP status and `CPS.xxxx` (or `APIG.xxxx`) code of the error.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        use ApiError as E;
        let bad = StatusCode::BAD_REQUEST;
        match self {
            E::BadBody(_) => (bad, "CPS.0001"),
            E::BadField { code, .. } => (bad, code),
            E::BodyTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "CPS.0001"),
            E::OffsetLimit => (bad, "CPS.0002"),
            E::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "CPS.0003"),
            E::InvalidPhoneId(_) => (bad, "CPS.0004"),
            E::PhoneNotFound(_) => (bad, "CPS.0005"),
            E::PhoneIdsEmpty => (bad, "CPS.0009"),
            E::Status => (bad, "CPS.0010"),
            E::JobNotFound(_) => (bad, "CPS.0011"),
            E::ServerNotFound(_) => (bad, "CPS.0015"),
            E::InvalidServerId => (bad, "CPS.0016"),
            E::Count => (bad, "CPS.0024"),
            E::PhoneName => (bad, "CPS.0025"),
            E::PhoneModelName => (bad, "CPS.0028"),
            E::ImageId => (bad, "CPS.0030"),
            E::BandWidth => (bad, "CPS.0031"),
            E::BandWidthId => (bad, "CPS.0033"),
            E::BandWidthShareType => (bad, "CPS.0034"),
            E::BandWidthSize => (bad, "CPS.0036"),
            E::Ports => (bad, "CPS.0037"),
            E::PortName => (bad, "CPS.0038"),
            E::PortNameConflict => (bad, "CPS.0039"),
            E::ListenPort => (bad, "CPS.0040"),
            E::ListenPortConflict => (bad, "CPS.0041"),
            E::RequestIdEmpty => (bad, "CPS.0049"),
            E::RequestIdInvalid(_) => (bad, "CPS.0264"),
            E::RequestJobsNotFound => (bad, "CPS.0050"),
            E::ExtendParam => (bad, "CPS.0055"),
            E::ChargingMode => (bad, "CPS.0056"),
            E::PeriodType => (bad, "CPS.0057"),
            E::PeriodNum => (bad, "CPS.0058"),
            E::AutoRenew => (bad, "CPS.0059"),
            E::AutoPay => (bad, "CPS.0060"),
            E::Capacity(_) => (bad, "CPS.0066"),
            E::KeypairEmpty => (bad, "CPS.0068"),
            E::KeypairNotFound(_) => (bad, "CPS.0067"),
            E::Property(_) => (bad, "CPS.0078"),
            E::PropertyUnsupported(_) => (bad, "CPS.0163"),
            E::PropertyInvalid(code, _) => (bad, code),
            E::PhoneIds => (bad, "CPS.0080"),
            E::ServerName => (bad, "CPS.0087"),
            E::ServerModelName => (bad, "CPS.0089"),
            E::InternetAccessible => (bad, "CPS.0093"),
            E::ServerIds => (bad, "CPS.0094"),
            E::ServerIdsEmpty => (bad, "CPS.0095"),
            E::BandWidthNotFound(_) => (bad, "CPS.0115"),
            E::Command => (bad, "CPS.0117"),
            E::Content => (bad, "CPS.0118"),
            E::NotApk => (bad, "CPS.0119"),
            E::EncodeServerId => (bad, "CPS.0121"),
            E::EncodeServerNotFound(_) => (bad, "CPS.0123"),
            E::BucketName => (bad, "CPS.0134"),
            E::ObjectPath => (bad, "CPS.0135"),
            E::PhoneNotRunning(_) => (bad, "CPS.0141"),
            E::ImageLabel | E::ImageModelMismatch { .. } => (bad, "CPS.0142"),
            E::ModelChangeRefused(_) => (bad, "CPS.0245"),
            E::ServerState(_) => (bad, "CPS.0105"),
            E::EventNotFound(_) => (bad, "CPS.0017"),
            E::EventState(..) => (bad, "CPS.0010"),
            E::EventParam(_) => (bad, "CPS.0001"),
            E::ServerModelUnsupported(_) => (bad, "CPS.0247"),
            E::PhoneModelUnsupported(..) => (bad, "CPS.0257"),
            E::PortsLimit => (bad, "CPS.0145"),
            E::FilePaths => (bad, "CPS.0155"),
            E::OnlySharedBandwidth => (bad, "CPS.0160"),
            E::TooManyRequestIds => (bad, "CPS.0161"),
            E::ImageNotFound(_) => (bad, "CPS.0166"),
            E::StorageInfos => (bad, "CPS.0167"),
            E::StorageInfosLimit => (bad, "CPS.0170"),
            E::IncludeFiles => (bad, "CPS.0168"),
            E::ExcludeFiles => (bad, "CPS.0169"),
            E::RestoreInfos => (bad, "CPS.0171"),
            E::PackageName => (bad, "CPS.0173"),
            E::Path => (bad, "CPS.0199"),
            E::TrafficType => (bad, "CPS.0207"),
            E::TooManyPhoneIds => (bad, "CPS.0209"),
            E::SamePhone => (bad, "CPS.0231"),
            E::MigrateInfos => (bad, "CPS.0234"),
            E::SourcePhone(_) => (bad, "CPS.0232"),
            E::TargetPhone(_) => (bad, "CPS.0233"),
            E::NetworkVersion => (bad, "CPS.0240"),
            E::InsufficientBms(_) => (bad, "CPS.0242"),
            E::ServerModelNotFound(_) => (bad, "CPS.0246"),
            E::SameModel => (bad, "CPS.0250"),
            E::SyncShellRate => (bad, "CPS.0042"),
            E::NotFound => (StatusCode::NOT_FOUND, "CPS.0001"),
            E::Forbidden => (StatusCode::FORBIDDEN, "CPS.0001"),
            E::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "APIG.0301"),
            E::Field(_) => (bad, "CPS.0001"),
            E::NoAccessPort(_) => (bad, "CPS.0022"),
            E::Type => (bad, "CPS.0116"),
            E::IsPublic => (bad, "CPS.0143"),
            E::ProductType => (bad, "CPS.0144"),
            E::EncodeServerIds => (bad, "CPS.0122"),
            E::PreInstallApp => (bad, "CPS.0148"),
            E::ImageName => (bad, "CPS.0162"),
            E::ImageNotActive(_) => (bad, "CPS.0220"),
            E::PhoneNotSettled(_) => (bad, "CPS.0165"),
            E::TooManyMembers(..) => (bad, "CPS.0196"),
            E::ShareFilesUnsupported(_) => (bad, "CPS.0137"),
            E::ShareAppsUnsupported(_) => (bad, "CPS.0147"),
            E::ServerDeleting(_) | E::ServerCreating(_) => (bad, "CPS.0105"),
            E::TooManyServerIds(_) => (bad, "CPS.0096"),
            E::TagResourceType(_) => (bad, "CPS.0300"),
            E::TagResourceId => (bad, "CPS.0301"),
            E::TagResourceNotFound(_) => (bad, "CPS.0302"),
            E::Tags(_) => (bad, "CPS.0303"),
            E::TagKey(_) => (bad, "CPS.0304"),
            E::TagValue(_) => (bad, "CPS.0305"),
            E::TagKeyReserved(_) => (bad, "CPS.0306"),
            E::TooManyTags(_) => (bad, "CPS.0307"),
            E::MatchKey(_) => (bad, "CPS.0313"),
            E::MatchValue => (bad, "CPS.0314"),
            E::TagValues(_) => (bad, "CPS.0315"),
        }
    }

    /// The reference's message for the error.
    pub fn message(&self) -> String {
        let s = self.to_string();
        let mut c = s.chars();
        match c.next() {
            Some(first) => first.to_uppercase().collect::<String>() + c.as_str() + ".",
            None => s,
        }
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        ApiError::Internal(e.to_string())
    }
}
