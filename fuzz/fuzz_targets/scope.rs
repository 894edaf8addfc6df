//! Task declarations and credential requests as the API receives them, then scope
//! containment: if one scope covers another, every concrete (target, action, resource)
//! the inner one admits is admitted by the outer one.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mayfly::task::{
    CredentialRequest, RawCredentialRequest, RawTaskRequest, Scope, TaskRequest, pattern_covers,
};

fn admits(scope: &Scope, target: &str, action: &str, resource: &str) -> bool {
    scope.grants().iter().any(|g| {
        g.target == target
            && g.actions.contains(action)
            && g.resources.iter().any(|p| pattern_covers(p, resource))
    })
}

fuzz_target!(|data: &[u8]| {
    let parts = mayfly_fuzz::frames(data, 4);
    let parse = |i: usize| -> Option<TaskRequest> {
        let raw: RawTaskRequest = serde_json::from_slice(parts.get(i)?).ok()?;
        TaskRequest::try_from(raw).ok()
    };
    if let Some(bytes) = parts.get(2) {
        if let Ok(raw) = serde_json::from_slice::<RawCredentialRequest>(bytes) {
            let _ = CredentialRequest::try_from(raw);
        }
    }
    let (Some(outer), Some(inner)) = (parse(0), parse(1)) else {
        return;
    };
    // Probe: a concrete name from the last frame, "target\naction\nresource".
    let probe = parts
        .get(3)
        .and_then(|p| std::str::from_utf8(p).ok())
        .unwrap_or("");
    let mut it = probe.splitn(3, '\n');
    let (t, a, r) = (
        it.next().unwrap_or(""),
        it.next().unwrap_or(""),
        it.next().unwrap_or(""),
    );
    if outer.scope.covers(&inner.scope) && admits(&inner.scope, t, a, r) {
        assert!(
            admits(&outer.scope, t, a, r),
            "inner admits {t} {a} {r}; outer does not"
        );
    }
    // Coverage is reflexive.
    assert!(outer.scope.covers(&outer.scope));
});
