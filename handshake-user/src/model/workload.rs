//! Whose a socket is, read from its cgroup v2 path: the container (Docker,
//! containerd, CRI-O, Podman, and the plain cgroupfs layouts), the
//! Kubernetes pod, and the systemd unit. Pure: the path in, the names out.

/// What a cgroup path names; `None` for what it does not.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Workload {
    /// The 64-hex container id.
    pub container_id: Option<String>,
    /// The Kubernetes pod UID, with dashes.
    pub pod_uid: Option<String>,
    /// The innermost `.service`, or a `.scope` that is not a container.
    pub unit: Option<String>,
}

/// Prefixes of the systemd scopes container runtimes make:
/// `<prefix><id>.scope`.
const CONTAINER_SCOPES: [&str; 4] = ["docker-", "cri-containerd-", "crio-", "libpod-"];

/// Parents under which a bare 64-hex directory is a container (the
/// cgroupfs drivers: `/docker/<id>`, `/kubepods/…/pod<uid>/<id>`).
const CONTAINER_PARENTS: [&str; 3] = ["docker", "kubepods", "libpod_parent"];

fn is_container_id(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A pod UID as the kubelet writes it: 8-4-4-4-12 hex digits.
fn is_pod_uid(text: &str) -> bool {
    let groups: Vec<&str> = text.split('-').collect();
    groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups
            .iter()
            .all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The container id a path component names, if it names one.
fn container_of(component: &str, under_runtime: bool) -> Option<&str> {
    if let Some(scope) = component.strip_suffix(".scope") {
        return CONTAINER_SCOPES
            .iter()
            .find_map(|prefix| scope.strip_prefix(prefix))
            .filter(|id| is_container_id(id));
    }
    (under_runtime && is_container_id(component)).then_some(component)
}

/// The pod UID a path component names: `kubepods-…-pod<uid with _>.slice`
/// (systemd driver) or `pod<uid>` (cgroupfs driver).
fn pod_of(component: &str, under_kubepods: bool) -> Option<String> {
    if let Some(slice) = component.strip_suffix(".slice")
        && slice.starts_with("kubepods")
        && let Some((_, uid)) = slice.rsplit_once("-pod")
    {
        let uid = uid.replace('_', "-");
        return is_pod_uid(&uid).then_some(uid);
    }
    let uid = component.strip_prefix("pod")?;
    (under_kubepods && is_pod_uid(uid)).then(|| uid.to_owned())
}

impl Workload {
    /// What `path` (as `/proc/PID/cgroup` shows it, from the v2 root)
    /// names.
    pub fn of(path: &str) -> Self {
        let mut workload = Self::default();
        let (mut under_runtime, mut under_kubepods) = (false, false);
        for component in path.split('/').filter(|c| !c.is_empty()) {
            let container = container_of(component, under_runtime);
            if let Some(id) = container {
                workload.container_id = Some(id.to_owned());
            } else if let Some(uid) = pod_of(component, under_kubepods) {
                workload.pod_uid = Some(uid);
            } else if component.ends_with(".service") || component.ends_with(".scope") {
                workload.unit = Some(component.to_owned());
            }
            let plain = component.strip_suffix(".slice").unwrap_or(component);
            under_runtime |= CONTAINER_PARENTS.contains(&plain) || plain.starts_with("kubepods");
            under_kubepods |= plain.starts_with("kubepods");
        }
        if workload.container_id.is_some() {
            // The unit around a container is its runtime's, not its own.
            workload.unit = workload.unit.filter(|u| !u.ends_with(".scope"));
        }
        workload
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const UID: &str = "1f2e3d4c-5b6a-4978-8695-a4b3c2d1e0f9";

    fn of(path: &str) -> (Option<&'static str>, Option<String>, Option<String>) {
        let w = Workload::of(path);
        (
            w.container_id
                .map(|id| if id == ID { "ID" } else { "other" }),
            w.pod_uid,
            w.unit,
        )
    }

    #[test]
    fn systemd_driver_containers_and_pods() {
        assert_eq!(
            of(&format!("/system.slice/docker-{ID}.scope")),
            (Some("ID"), None, None)
        );
        let uid = UID.replace('-', "_");
        for runtime in ["cri-containerd", "crio"] {
            assert_eq!(
                of(&format!(
                    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid}.slice/{runtime}-{ID}.scope"
                )),
                (Some("ID"), Some(UID.to_owned()), None)
            );
        }
        assert_eq!(
            of(&format!("/kubepods.slice/kubepods-pod{uid}.slice")),
            (None, Some(UID.to_owned()), None)
        );
        assert_eq!(
            of(&format!("/machine.slice/libpod-{ID}.scope/container")),
            (Some("ID"), None, None)
        );
    }

    #[test]
    fn cgroupfs_driver_containers_and_pods() {
        assert_eq!(of(&format!("/docker/{ID}")), (Some("ID"), None, None));
        assert_eq!(
            of(&format!("/kubepods/burstable/pod{UID}/{ID}")),
            (Some("ID"), Some(UID.to_owned()), None)
        );
        // A 64-hex name elsewhere is not a container.
        assert_eq!(of(&format!("/mystuff/{ID}")), (None, None, None));
    }

    #[test]
    fn units_are_the_innermost_service_or_a_plain_scope() {
        assert_eq!(
            of("/system.slice/nginx.service"),
            (None, None, Some("nginx.service".to_owned()))
        );
        assert_eq!(
            of("/system.slice/foo.service/worker"),
            (None, None, Some("foo.service".to_owned()))
        );
        assert_eq!(
            of("/user.slice/user-0.slice/session-3.scope"),
            (None, None, Some("session-3.scope".to_owned()))
        );
        assert_eq!(of("/"), (None, None, None));
        assert_eq!(of("/system.slice"), (None, None, None));
        // Not quite ids: too short, not hex.
        assert_eq!(
            of("/system.slice/docker-abc.scope"),
            (None, None, Some("docker-abc.scope".to_owned()))
        );
    }
}
