//! Hostcalls rollsafe makes without the SDK's wrappers, because those wrappers panic on any
//! status they do not expect, and a panic is a trap: on Kong's host a trap in one request with
//! another request's dispatch in flight took the nginx worker down (segfault), ending every
//! request it held. Seen: `set_property` on a host that does not know the property (bare
//! ngx_wasm_module has no `kong.*`); possible: a shared-data write refused by a full shm zone,
//! a metric an older host cannot define, a log line or a clock read a host refuses. Each must
//! be an error, not a crash. Its `unsafe` (with the allocator's, `crate::pool`, the crate's
//! only) calls the imports the SDK declares as the SDK calls them. (`dispatch_http_call`
//! stays the SDK's: its dispatcher routes the answer to the request by a token only the SDK's
//! own call registers.)
#![allow(unsafe_code)]

use proxy_wasm::types::{BufferType, LogLevel, MapType, MetricType, Status, StreamType};

#[cfg(target_arch = "wasm32")]
#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_set_property(
        path_data: *const u8,
        path_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> Status;
    fn proxy_set_shared_data(
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
        cas: u32,
    ) -> Status;
    fn proxy_send_local_response(
        status_code: u32,
        status_code_details_data: *const u8,
        status_code_details_size: usize,
        body_data: *const u8,
        body_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> Status;
    fn proxy_replace_header_map_value(
        map_type: MapType,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> Status;
    fn proxy_remove_header_map_value(
        map_type: MapType,
        key_data: *const u8,
        key_size: usize,
    ) -> Status;
    fn proxy_get_buffer_bytes(
        buffer_type: BufferType,
        start: usize,
        max_size: usize,
        return_buffer_data: *mut *mut u8,
        return_buffer_size: *mut usize,
    ) -> Status;
    fn proxy_get_shared_data(
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
        return_cas: *mut u32,
    ) -> Status;
    fn proxy_get_property(
        path_data: *const u8,
        path_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> Status;
    fn proxy_get_header_map_value(
        map_type: MapType,
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> Status;
    fn proxy_get_header_map_pairs(
        map_type: MapType,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> Status;
    fn proxy_continue_stream(stream_type: StreamType) -> Status;
    fn proxy_define_metric(
        metric_type: MetricType,
        name_data: *const u8,
        name_size: usize,
        return_id: *mut u32,
    ) -> Status;
    fn proxy_increment_metric(metric_id: u32, offset: i64) -> Status;
    fn proxy_log(level: LogLevel, message_data: *const u8, message_size: usize) -> Status;
    fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> Status;
    fn proxy_set_effective_context(context_id: u32) -> Status;
}

/// A host call's status as a result: anything but Ok is an error, never a trap.
#[cfg(target_arch = "wasm32")]
fn checked(status: Status) -> Result<(), Status> {
    match status {
        Status::Ok => Ok(()),
        status => Err(status),
    }
}

/// Resumes a stream the filter paused (Envoy; Kong's host resumes by itself).
pub fn continue_stream(stream: StreamType) -> Result<(), Status> {
    #[cfg(target_arch = "wasm32")]
    {
        // SAFETY: no pointers are passed.
        checked(unsafe { proxy_continue_stream(stream) })
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        let _ = stream;
        Err(Status::InternalFailure)
    }
}

/// Sets a host property; the host's status comes back as an error instead of a trap.
pub fn set_property(path: &[u8], value: &[u8]) -> Result<(), Status> {
    #[cfg(target_arch = "wasm32")]
    {
        // SAFETY: both pointers are valid for their lengths for the duration of the call; the
        // host only reads them.
        checked(unsafe {
            proxy_set_property(path.as_ptr(), path.len(), value.as_ptr(), value.len())
        })
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        let _ = (path, value);
        Err(Status::InternalFailure)
    }
}

/// Writes shared data when the stored CAS still equals `cas` (0: Envoy, no check; Kong, absent).
pub fn set_shared_data(key: &[u8], value: &[u8], cas: u32) -> Result<(), Status> {
    #[cfg(target_arch = "wasm32")]
    {
        // SAFETY: as in `set_property`.
        checked(unsafe {
            proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas)
        })
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        let _ = (key, value, cas);
        Err(Status::InternalFailure)
    }
}

/// A header map as the host serialises it, kept whole: the SDK's `get_map` turns it into a
/// `String` pair per header, and that allocation is most of the cost of reading a request's
/// headers on every request that might be retried (see `headers::HeaderBlock`).
pub fn header_map_bytes(map_type: MapType) -> Option<Vec<u8>> {
    #[cfg(target_arch = "wasm32")]
    {
        let mut data: *mut u8 = std::ptr::null_mut();
        let mut size: usize = 0;
        // SAFETY: both out-pointers are valid places for the host to write. On success the
        // host has filled a buffer it obtained from this module's `proxy_on_memory_allocate`
        // (the SDK's: `Vec::with_capacity(size)`, forgotten), so it is owned here as a Vec of
        // that capacity, exactly as the SDK's own `get_map` takes it.
        match unsafe { proxy_get_header_map_pairs(map_type, &mut data, &mut size) } {
            Status::Ok if !data.is_null() => Some(unsafe { Vec::from_raw_parts(data, size, size) }),
            _ => None,
        }
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        let _ = map_type;
        None
    }
}

/// One header's value as bytes. The SDK's `get_map_value` (and `get_map`) panic on a value
/// that is not UTF-8 — a client may send obs-text bytes, so a header could trap the VM.
pub fn header_map_value(map_type: MapType, name: &str) -> Option<Vec<u8>> {
    #[cfg(target_arch = "wasm32")]
    {
        let mut data: *mut u8 = std::ptr::null_mut();
        let mut size: usize = 0;
        // SAFETY: as in `header_map_bytes`; `name` is valid for its length.
        match unsafe {
            proxy_get_header_map_value(map_type, name.as_ptr(), name.len(), &mut data, &mut size)
        } {
            Status::Ok if data.is_null() => Some(Vec::new()),
            Status::Ok => Some(unsafe { Vec::from_raw_parts(data, size, size) }),
            _ => None,
        }
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        let _ = (map_type, name);
        None
    }
}

/// Takes ownership of a buffer the host filled (allocated through this module's
/// `proxy_on_memory_allocate`, the SDK's: `Vec::with_capacity(size)`, forgotten).
#[cfg(target_arch = "wasm32")]
fn owned(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() {
        return Vec::new();
    }
    // SAFETY: see above; exactly how the SDK's own wrappers take such a buffer.
    unsafe { Vec::from_raw_parts(data, size, size) }
}

/// Answers the request locally. The SDK's `send_http_response` panics on any status but Ok.
pub fn send_local_response(status: u32, headers: &[u8], body: &[u8]) -> Result<(), Status> {
    #[cfg(target_arch = "wasm32")]
    {
        // SAFETY: every pointer is valid for its length during the call; the host only reads.
        checked(unsafe {
            proxy_send_local_response(
                status,
                std::ptr::null(),
                0,
                body.as_ptr(),
                body.len(),
                headers.as_ptr(),
                headers.len(),
                -1,
            )
        })
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        let _ = (status, headers, body);
        Err(Status::InternalFailure)
    }
}

/// Sets (replaces) a header; the SDK's `set_map_value` panics on any status but Ok.
pub fn replace_header(map_type: MapType, name: &str, value: &str) -> Result<(), Status> {
    #[cfg(target_arch = "wasm32")]
    {
        // SAFETY: as in `set_property`.
        checked(unsafe {
            proxy_replace_header_map_value(
                map_type,
                name.as_ptr(),
                name.len(),
                value.as_ptr(),
                value.len(),
            )
        })
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        let _ = (map_type, name, value);
        Err(Status::InternalFailure)
    }
}

/// Removes a header; the SDK's `remove_map_value` panics on any status but Ok.
pub fn remove_header(map_type: MapType, name: &str) -> Result<(), Status> {
    #[cfg(target_arch = "wasm32")]
    {
        // SAFETY: as in `set_property`.
        checked(unsafe { proxy_remove_header_map_value(map_type, name.as_ptr(), name.len()) })
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        let _ = (map_type, name);
        Err(Status::InternalFailure)
    }
}

/// Up to `max` bytes of a buffer from `start`; `None` when the host has none to give.
pub fn buffer(buffer_type: BufferType, start: usize, max: usize) -> Option<Vec<u8>> {
    #[cfg(target_arch = "wasm32")]
    {
        let mut data: *mut u8 = std::ptr::null_mut();
        let mut size: usize = 0;
        // SAFETY: both out-pointers are valid places for the host to write.
        match unsafe { proxy_get_buffer_bytes(buffer_type, start, max, &mut data, &mut size) } {
            Status::Ok => Some(owned(data, size)),
            _ => None,
        }
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        let _ = (buffer_type, start, max);
        None
    }
}

/// A shared-data value and its CAS; `None` for an absent key or any refusal.
pub fn shared_data(key: &[u8]) -> Option<(Vec<u8>, u32)> {
    #[cfg(target_arch = "wasm32")]
    {
        let mut data: *mut u8 = std::ptr::null_mut();
        let mut size: usize = 0;
        let mut cas: u32 = 0;
        // SAFETY: `key` is valid for its length; the out-pointers are valid places to write.
        match unsafe {
            proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas)
        } {
            Status::Ok => Some((owned(data, size), cas)),
            _ => None,
        }
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        let _ = key;
        None
    }
}

/// A property's value; `None` when absent or refused (the SDK panics on statuses it does
/// not expect).
pub fn property(path: &[u8]) -> Option<Vec<u8>> {
    #[cfg(target_arch = "wasm32")]
    {
        let mut data: *mut u8 = std::ptr::null_mut();
        let mut size: usize = 0;
        // SAFETY: `path` is valid for its length; the out-pointers are valid places to write.
        match unsafe { proxy_get_property(path.as_ptr(), path.len(), &mut data, &mut size) } {
            Status::Ok => Some(owned(data, size)),
            _ => None,
        }
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        let _ = path;
        None
    }
}

/// Defines a metric; a host that cannot (older Kong pins) says so instead of trapping.
pub fn define_metric(metric_type: MetricType, name: &str) -> Result<u32, Status> {
    #[cfg(target_arch = "wasm32")]
    {
        let mut id: u32 = 0;
        // SAFETY: `name` is valid for its length; `id` is a valid place for the host to write.
        match unsafe { proxy_define_metric(metric_type, name.as_ptr(), name.len(), &mut id) } {
            Status::Ok => Ok(id),
            status => Err(status),
        }
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        let _ = (metric_type, name);
        Err(Status::InternalFailure)
    }
}

/// Adds `offset` to a metric. (The SDK's wrapper panics on any status but `NotFound` and
/// `BadArgument`.)
pub fn increment_metric(id: u32, offset: i64) -> Result<(), Status> {
    #[cfg(target_arch = "wasm32")]
    {
        // SAFETY: plain values; the host reads nothing from this module's memory.
        match unsafe { proxy_increment_metric(id, offset) } {
            Status::Ok => Ok(()),
            status => Err(status),
        }
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        let _ = (id, offset);
        Err(Status::InternalFailure)
    }
}

/// Writes a log line.
pub fn log(level: LogLevel, message: &str) -> Result<(), Status> {
    #[cfg(target_arch = "wasm32")]
    {
        // SAFETY: the message is valid for its length during the call; the host only reads.
        checked(unsafe { proxy_log(level, message.as_ptr(), message.len()) })
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        let _ = (level, message);
        Err(Status::InternalFailure)
    }
}

/// The host's wall clock, nanoseconds since the Unix epoch.
pub fn current_time_ns() -> Result<u64, Status> {
    #[cfg(target_arch = "wasm32")]
    {
        let mut ns: u64 = 0;
        // SAFETY: the out-pointer is a valid place to write.
        checked(unsafe { proxy_get_current_time_nanoseconds(&mut ns) }).map(|()| ns)
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        Err(Status::InternalFailure)
    }
}

/// Makes a request's context the current one (a root callback acting for it).
pub fn set_effective_context(id: u32) -> Result<(), Status> {
    #[cfg(target_arch = "wasm32")]
    {
        // SAFETY: no pointers.
        checked(unsafe { proxy_set_effective_context(id) })
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        let _ = id;
        Err(Status::InternalFailure)
    }
}
