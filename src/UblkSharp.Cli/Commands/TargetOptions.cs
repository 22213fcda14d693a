using System.CommandLine;
using UblkSharp.Targets;

namespace UblkSharp.Cli.Commands;

/// <summary>
/// The options that describe a target (`-t TYPE` and its settings), shared by the commands that
/// build one (`add`, `serve`), and the recipe they make: the dictionary <see cref="TargetFactory"/>
/// takes and a device records.
/// </summary>
internal sealed class TargetOptions
{
    public Option<string> Type { get; } = new("--type", "-t") { Description = $"Target type: {string.Join(", ", TargetFactory.Kinds)}", Required = true };

    public Option<string?> File { get; } = new("--file", "-f") { Description = "loop: the backing file or block device; cow: the COW file; qcow2: the image" };

    public Option<string?> Size { get; } = new("--size", "-s") { Description = "null, mem: the device size, e.g. 1G; qcow2 --create: the virtual size (default: the backing file's)" };

    public Option<bool> DirectIo { get; } = new("--direct-io") { Description = "loop: open the backing file with O_DIRECT" };

    public Option<bool> ReadOnly { get; } = new("--read-only") { Description = "loop, cow, rbd, qcow2: a read-only device (serve: a read-only export)" };

    public Option<string?> Base { get; } = new("--base") { Description = "fault: the target type to wrap (null, mem, loop)" };

    public Option<string?> Seed { get; } = new("--seed") { Description = "fault: seed of the fault schedule" };

    public Option<string?> ShortIo { get; } = new("--short") { Description = "fault: rate of short backend IO (0-1), retried" };

    public Option<string?> Again { get; } = new("--eagain") { Description = "fault: rate of EAGAIN (0-1), retried" };

    public Option<string?> Eio { get; } = new("--eio") { Description = "fault: rate of EIO (0-1), failed to the client" };

    public Option<string?> Delay { get; } = new("--delay") { Description = "fault: rate of delayed requests (0-1)" };

    public Option<string?> DelayMs { get; } = new("--delay-ms") { Description = "fault: the delay in milliseconds (default 5)" };

    public Option<string?> Backing { get; } = new("--backing") { Description = "cow: the backing image for --create (or instead of the one the COW header names); qcow2: instead of the backing file the image names" };

    public Option<bool> Create { get; } = new("--create") { Description = "cow: make a new COW file -f OVERLAY over --backing BASE; qcow2: make a new image -f IMAGE --size SIZE [--backing BASE]" };

    public Option<bool> IgnoreBackingMismatch { get; } = new("--ignore-backing-mismatch") { Description = "cow: open the overlay even if the backing file's size or mtime changed" };

    public Option<string?> Io { get; } = new("--io") { Description = "loop and cow: ring (IO on each queue's io_uring), sync (on the queue thread) or auto (the ring unless a file is on tmpfs or ramfs; the default)" };

    public Option<string?> Allocate { get; } = new("--allocate") { Description = "cow: allocate the COW file's data area in chunks of this size at their first write, e.g. 64K (the default) or 1M; 0 keeps it as sparse as what was written" };

    public Option<string?> Writeback { get; } = new("--writeback") { Description = "cow: seconds between writing set bitmap bits back without a flush (data synced first; default 30, the page cache's own expiry); 0 for only on flush" };

    public Option<string?> Uri { get; } = new("--uri") { Description = "nbd: the remote export, nbd://HOST:PORT/EXPORT or nbd+unix:///EXPORT?socket=PATH; nbds:// and nbds+unix:// for TLS" };

    /// <summary>Only where the command has no --tls-certificates of its own (serve has, for its server); see <see cref="AddClientTlsTo"/>.</summary>
    public Option<string?> TlsCertificates { get; } = new("--tls-certificates") { Description = "nbd with nbds:// URIs: directory with ca-cert.pem (the CA the server's certificate must chain to) and, for servers that verify clients, client-cert.pem and client-key.pem" };

    /// <summary>Only where the command has no --tls-psk of its own, as <see cref="TlsCertificates"/>.</summary>
    public Option<string?> TlsPsk { get; } = new("--tls-psk") { Description = "nbd with nbds:// URIs: TLS-PSK with a psktool key file (username:hexkey lines); the username is the URI's (nbds://USER@HOST/...), else your login name" };

    private bool _clientTls;

    public Option<string?> Pool { get; } = new("--pool") { Description = "rbd: the Ceph pool" };

    public Option<string?> Image { get; } = new("--image") { Description = "rbd: the RBD image" };

    public Option<string?> Conf { get; } = new("--conf") { Description = "rbd: the ceph.conf to use (default: librados' search, e.g. /etc/ceph/ceph.conf)" };

    public Option<string?> ClientId { get; } = new("--id") { Description = "rbd: the Ceph client id (default admin)" };

    public Option<string?> Keyring { get; } = new("--keyring") { Description = "rbd: the cephx keyring holding the key of client.ID (default: the conf's keyring setting)" };

    public Option<string?> KeyFile { get; } = new("--keyfile") { Description = "rbd: a file holding just client.ID's cephx key (instead of --keyring)" };

    public Option<string?> RbdCache { get; } = new("--rbd-cache") { Description = "rbd: librbd's cache: default (as the Ceph conf says), writethrough or none (both acknowledge a write only once the cluster has it, which --recovery needs)" };

    public Option<string?> EncryptionFormat { get; } = new("--encryption-format") { Description = "rbd: open the image's librbd encryption, luks1 or luks2 (made with `rbd encryption format`)" };

    public Option<string?> PassphraseFile { get; } = new("--passphrase-file") { Description = "rbd: the file holding the encryption passphrase (its bytes, exactly)" };

    public Option<string?> Snap { get; } = new("--snap") { Description = "rbd: serve this snapshot of the image (read-only)" };

    public Option<string?> SnapId { get; } = new("--snap-id") { Description = "rbd: serve the snapshot with this id (read-only; `rbd snap ls` shows ids)" };

    public Option<string?> Snapshot { get; } = new("--snapshot") { Description = "qcow2: serve this internal snapshot (its id or name)" };

    public Option<string?> CacheSize { get; } = new("--cache-size") { Description = "qcow2: bytes of L2 tables each image of the chain keeps in memory (default 1M; at least one table)" };

    public Option<string?> Timeout { get; } = new("--timeout") { Description = "rbd, nbd: seconds connecting or one IO may wait for the cluster or server before failing with EIO (default 30)" };

    public IEnumerable<Option> All =>
        [Type, File, Size, DirectIo, ReadOnly, Base, Seed, ShortIo, Again, Eio, Delay, DelayMs, Backing, Create, IgnoreBackingMismatch, Io, Allocate, Writeback, Uri,
            Pool, Image, Conf, ClientId, Keyring, KeyFile, RbdCache, EncryptionFormat, PassphraseFile, Snap, SnapId, Snapshot, CacheSize, Timeout];

    public void AddTo(Command command)
    {
        foreach (var option in All)
        {
            command.Options.Add(option);
        }
    }

    /// <summary>Adds the nbd target's --tls-certificates and --tls-psk (serve takes them in the URI instead: ?tls-certificates=DIR, ?tls-psk-file=FILE).</summary>
    public void AddClientTlsTo(Command command)
    {
        command.Options.Add(TlsCertificates);
        command.Options.Add(TlsPsk);
        _clientTls = true;
    }

    public string Kind(ParseResult r) => r.GetValue(Type)!;

    public Dictionary<string, string> Recipe(ParseResult r)
    {
        var recipe = new Dictionary<string, string>();
        void Put(string key, string? value)
        {
            if (value is not null)
            {
                recipe[key] = value;
            }
        }
        // Absolute: the daemon serves from / (never from a directory on its own device), and `recover` may run anywhere.
        Put("file", r.GetValue(File) is { Length: > 0 } file ? Path.GetFullPath(file) : null);
        Put("size", r.GetValue(Size));
        Put("direct-io", r.GetValue(DirectIo) ? "on" : null);
        Put("read-only", r.GetValue(ReadOnly) ? "on" : null);
        Put("base", r.GetValue(Base));
        Put("seed", r.GetValue(Seed));
        Put("short", r.GetValue(ShortIo));
        Put("eagain", r.GetValue(Again));
        Put("eio", r.GetValue(Eio));
        Put("delay", r.GetValue(Delay));
        Put("delay-ms", r.GetValue(DelayMs));
        Put("backing", r.GetValue(Backing) is { Length: > 0 } backing ? Path.GetFullPath(backing) : null);
        // Made once by whoever builds the target first; a command that builds it again (a daemon,
        // recovery) must drop "create" from the recipe after that (see AddCommand).
        Put("create", r.GetValue(Create) ? "on" : null);
        Put("ignore-backing-mismatch", r.GetValue(IgnoreBackingMismatch) ? "on" : null);
        Put("io", r.GetValue(Io));
        Put("allocate", r.GetValue(Allocate));
        Put("writeback", r.GetValue(Writeback));
        Put("uri", r.GetValue(Uri));
        Put("tls-certificates", _clientTls && r.GetValue(TlsCertificates) is { Length: > 0 } certificates ? Path.GetFullPath(certificates) : null);
        Put("tls-psk", _clientTls && r.GetValue(TlsPsk) is { Length: > 0 } psk ? Path.GetFullPath(psk) : null);
        Put("pool", r.GetValue(Pool));
        Put("image", r.GetValue(Image));
        // Absolute: the daemon (and a later recovery) may run from another directory.
        Put("conf", r.GetValue(Conf) is { Length: > 0 } conf ? Path.GetFullPath(conf) : null);
        Put("id", r.GetValue(ClientId));
        Put("keyring", r.GetValue(Keyring) is { Length: > 0 } keyring ? Path.GetFullPath(keyring) : null);
        Put("keyfile", r.GetValue(KeyFile) is { Length: > 0 } keyfile ? Path.GetFullPath(keyfile) : null);
        Put("cache", r.GetValue(RbdCache));
        Put("encryption-format", r.GetValue(EncryptionFormat));
        Put("passphrase-file", r.GetValue(PassphraseFile) is { Length: > 0 } passphrase ? Path.GetFullPath(passphrase) : null);
        Put("snap", r.GetValue(Snap));
        Put("snap-id", r.GetValue(SnapId));
        Put("snapshot", r.GetValue(Snapshot));
        Put("cache-size", r.GetValue(CacheSize));
        Put("timeout", r.GetValue(Timeout));
        return recipe;
    }
}
