using System.Runtime.InteropServices;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;
using UblkSharp.Interop;
using UblkSharp.Interop.Ceph;

namespace UblkSharp.Targets;

/// <summary>librbd's cache mode for an <see cref="RbdTarget"/> (<see cref="RbdTargetOptions.Cache"/>).</summary>
public enum RbdCache
{
    /// <summary>As the Ceph configuration says (librbd's default: write-around once the first flush came).</summary>
    Default,

    /// <summary>rbd_cache_policy = writethrough: reads cached, writes acknowledged once the cluster has them.</summary>
    Writethrough,

    /// <summary>rbd_cache = false.</summary>
    None,
}

/// <summary>How a new daemon takes the image's exclusive lock over from the device's previous one.</summary>
public enum RbdLockTakeover
{
    /// <summary>A first open: a lock held by anyone is a second writer, refused.</summary>
    None,

    /// <summary>After a hand-over (upgrade): the old daemon is letting go, so its lock is waited for (up to the timeout).</summary>
    Wait,

    /// <summary>
    /// After a crash: the lock is still the dead daemon's client's, so it is broken, with that client
    /// blocklisted first (it can never write again, even half-dead), as rbd-nbd and ceph-csi do.
    /// </summary>
    Break,
}

/// <summary>Which RBD image an <see cref="RbdTarget"/> serves, and how it reaches the cluster.</summary>
public sealed record RbdTargetOptions
{
    public required string Pool { get; init; }

    public required string Image { get; init; }

    /// <summary>The ceph.conf to read; null for librados' default search ($CEPH_CONF, /etc/ceph/ceph.conf, ...).</summary>
    public string? ConfigFile { get; init; }

    /// <summary>The client id ("admin" is client.admin).</summary>
    public string ClientId { get; init; } = "admin";

    /// <summary>
    /// librbd's cache: <see cref="RbdCache.Default"/> leaves it as the conf says (librbd acknowledges
    /// writes before the cluster has them once the first flush came); <see cref="RbdCache.Writethrough"/>
    /// and <see cref="RbdCache.None"/> acknowledge a write only when the cluster has it, so a daemon
    /// crash loses nothing the kernel was told was written (what user recovery needs).
    /// </summary>
    public RbdCache Cache { get; init; } = RbdCache.Default;

    /// <summary>Set by `recover` (never kept in a recipe): how the exclusive lock of the device's previous daemon is taken over.</summary>
    public RbdLockTakeover LockTakeover { get; init; }

    /// <summary>librbd's LUKS encryption of the image (made with `rbd encryption format`): "luks1", "luks2" or null for none.</summary>
    public string? EncryptionFormat { get; init; }

    /// <summary>The file whose bytes, exactly, are the LUKS passphrase (as `rbd encryption format` and rbd-nbd read it).</summary>
    public string? PassphraseFile { get; init; }

    /// <summary>A cephx keyring with the client's key; null for the conf's own keyring setting.</summary>
    public string? Keyring { get; init; }

    /// <summary>A file holding only the client's cephx key (librados' keyfile), instead of a keyring.</summary>
    public string? KeyFile { get; init; }

    /// <summary>A snapshot to serve (read-only); null for the image head.</summary>
    public string? Snapshot { get; init; }

    /// <summary>A snapshot to serve (read-only) by its id, as `rbd snap ls` shows it (rbd-nbd's --snap-id); null for none.</summary>
    public ulong? SnapshotId { get; init; }

    public bool ReadOnly { get; init; }

    /// <summary>
    /// How long connecting, and each IO, may wait for the cluster: a request the cluster does not
    /// answer in that time fails (with EIO) instead of hanging the device.
    /// </summary>
    public TimeSpan Timeout { get; init; } = TimeSpan.FromSeconds(30);

    /// <summary>Where resizes of the image, and trouble watching for them, are reported; by default nowhere.</summary>
    public ILoggerFactory LoggerFactory { get; init; } = NullLoggerFactory.Instance;
}

/// <summary>
/// A Ceph RBD image through librbd (like rbd-nbd and qemu's rbd driver). Each ublk queue submits
/// librbd's asynchronous IO from its own thread on the one image handle and learns of its own
/// completions through its own eventfd (<see cref="RbdCompletionMailbox"/>), read by an io_uring
/// READ on the queue's ring; the NBD export uses the
/// synchronous calls from its worker threads. A writable image is opened with its exclusive lock
/// taken and held (not handed over on request), so a second writer is refused rather than
/// interleaved. Size comes from the image; a resize is noticed (a header watch) and reported.
/// </summary>
public sealed unsafe class RbdTarget : BlockTarget
{
    private const int SyncChunk = 1 << 30;

    private readonly RbdTargetOptions _options;
    private readonly bool _readOnly;
    private readonly ILogger _logger;
    private nint _cluster;
    private nint _ioctx;
    private nint _image;
    private ulong _watchHandle;
    private GCHandle _self;
    private long _imageSize;
    private long _size;
    private readonly List<RbdCompletionMailbox> _mailboxes = [];
    private bool _disposed;

    public RbdTarget(RbdTargetOptions options)
    {
        ArgumentNullException.ThrowIfNull(options);
        _options = options;
        _logger = (options.LoggerFactory ?? NullLoggerFactory.Instance).CreateLogger<RbdTarget>();
        if (options.Snapshot is not null && options.SnapshotId is not null)
        {
            throw new ArgumentException("--snap and --snap-id exclude each other: give one");
        }
        _readOnly = options.ReadOnly || options.Snapshot is not null || options.SnapshotId is not null;
        try
        {
            Open();
        }
        catch
        {
            Close();
            throw;
        }
    }

    public RbdTargetOptions Options => _options;

    /// <summary>"pool/image" or "pool/image@snap", for messages.</summary>
    public string Name => $"{_options.Pool}/{_options.Image}{(_options.Snapshot is not null ? "@" + _options.Snapshot : _options.SnapshotId is { } id ? $"@{{id {id}}}" : "")}";

    /// <summary>The image's size when it was opened, or as last followed (<see cref="Resize"/>): a device cannot follow a resize on 6.12.</summary>
    public override long Size => Volatile.Read(ref _size);

    /// <summary>Set by a daemon whose kernel has UPDATE_SIZE: it follows <see cref="Resized"/> with <see cref="Resize"/>.</summary>
    public bool FollowsResizes { get; set; }

    public override bool CanResize => !_readOnly;

    /// <summary>The device follows the image: IO up to <paramref name="newSize"/> goes to librbd, which checks it against the image.</summary>
    public override void Resize(long newSize, bool growBacking)
    {
        if (_readOnly)
        {
            throw new NotSupportedException($"{Name} is served read-only: the device cannot change its size");
        }
        Volatile.Write(ref _size, newSize & ~511L);
    }

    /// <summary>The image's size as last seen: it differs from <see cref="Size"/> after a resize.</summary>
    public long ImageSize => Volatile.Read(ref _imageSize);

    /// <summary>Called (on a librbd thread) with the old and new image size when the image is resized.</summary>
    public event Action<long, long>? Resized;

    public override string Kind => "rbd";

    public override IReadOnlyDictionary<string, string> Recipe
    {
        get
        {
            var r = new Dictionary<string, string> { ["pool"] = _options.Pool, ["image"] = _options.Image, ["id"] = _options.ClientId };
            if (_options.ConfigFile is not null)
            {
                r["conf"] = _options.ConfigFile;
            }
            if (_options.EncryptionFormat is not null)
            {
                r["encryption-format"] = _options.EncryptionFormat;
                r["passphrase-file"] = _options.PassphraseFile!;
            }
            if (_options.Cache != RbdCache.Default)
            {
                r["cache"] = _options.Cache == RbdCache.None ? "none" : "writethrough";
            }
            if (_options.Keyring is not null)
            {
                r["keyring"] = _options.Keyring;
            }
            if (_options.KeyFile is not null)
            {
                r["keyfile"] = _options.KeyFile;
            }
            if (_options.Snapshot is not null)
            {
                r["snap"] = _options.Snapshot;
            }
            if (_options.SnapshotId is { } snapId)
            {
                r["snap-id"] = snapId.ToString(System.Globalization.CultureInfo.InvariantCulture);
            }
            if (_options.ReadOnly)
            {
                r["read-only"] = "on";
            }
            r["timeout"] = ((long)_options.Timeout.TotalSeconds).ToString(System.Globalization.CultureInfo.InvariantCulture);
            return r;
        }
    }

    public override bool IsReadOnly => _readOnly;

    public override bool HasVolatileCache => !_readOnly;

    /// <summary>
    /// Read-only, or every acknowledged write is in the cluster (cache writethrough or none): a new
    /// daemon that opens the image again sees everything the kernel was told was written.
    /// </summary>
    public override bool SurvivesRestart => _readOnly || _options.Cache != RbdCache.Default;

    // A hand-over flushes first, so an upgrade is safe with any cache.
    public override bool SurvivesHandOver => true;

    public override string RecoveryRefusal =>
        "librbd's cache as the Ceph configuration sets it acknowledges writes the cluster does not have yet, so a recovered device could lose writes its file system counts as done: add --rbd-cache writethrough (or none)";

    public override bool CanDiscard => !_readOnly;

    private void Open()
    {
        var o = _options;
        var seconds = Math.Max(1, (long)Math.Ceiling(o.Timeout.TotalSeconds)).ToString(System.Globalization.CultureInfo.InvariantCulture);
        int r;
        try
        {
            r = Rados.rados_create2(out _cluster, "ceph", "client." + o.ClientId, 0);
        }
        catch (DllNotFoundException e)
        {
            throw new IOException("the rbd target needs librados.so.2 and librbd.so.1: install librados2 and librbd1", e);
        }
        Check(r, "creating a librados handle");
        r = Rados.rados_conf_read_file(_cluster, o.ConfigFile);
        if (r < 0)
        {
            throw new IOException(o.ConfigFile is null
                ? $"no Ceph configuration found ({Errno.Describe(r)}): give one with --conf"
                : $"cannot read the Ceph configuration {o.ConfigFile}: {Errno.Describe(r)}");
        }
        // Bounded waits: connecting, monitor commands and every OSD op give up after the timeout,
        // so an unreachable or silent cluster fails requests (and `add`) instead of hanging them.
        foreach (var option in new[] { "client_mount_timeout", "rados_mon_op_timeout", "rados_osd_op_timeout" })
        {
            Check(Rados.rados_conf_set(_cluster, option, seconds), $"setting {option}");
        }
        foreach (var (option, value) in _options.Cache switch
        {
            RbdCache.Writethrough => new[] { ("rbd_cache", "true"), ("rbd_cache_policy", "writethrough") },
            RbdCache.None => [("rbd_cache", "false")],
            _ => [],
        })
        {
            Check(Rados.rados_conf_set(_cluster, option, value), $"setting {option}");
        }
        if (o.LockTakeover == RbdLockTakeover.Break)
        {
            // Whatever the conf says: the lock's dead owner must never write again.
            Check(Rados.rados_conf_set(_cluster, "rbd_blocklist_on_break_lock", "true"), "setting rbd_blocklist_on_break_lock");
        }
        // The key given replaces the conf's: "keyring" and "keyfile" are librados' own settings.
        var key = o.KeyFile ?? o.Keyring;
        if (key is not null)
        {
            Check(Rados.rados_conf_set(_cluster, o.KeyFile is not null ? "keyfile" : "keyring", key), $"setting the key file {key}");
        }
        r = Rados.rados_connect(_cluster);
        if (r < 0)
        {
            var keySource = key ?? "the conf's keyring";
            throw new IOException($"cannot connect to the Ceph cluster{(o.ConfigFile is null ? "" : " of " + o.ConfigFile)} as client.{o.ClientId}: " + r switch
            {
                -Errno.ETIMEDOUT => $"no monitor answered within {seconds} s",
                // cephx: the monitor refused the key (or knows no such client).
                -Errno.EACCES or -Errno.EPERM => $"cephx authentication failed: the cluster refused the key of client.{o.ClientId} in {keySource} (check --id and --keyring or --keyfile)",
                // librados could not find or decode a key.
                -Errno.EINVAL or -Errno.ENOENT when key is not null => $"no usable cephx key for client.{o.ClientId} in {key} ({Errno.Describe(r)})",
                _ => Errno.Describe(r),
            });
        }
        r = Rados.rados_ioctx_create(_cluster, o.Pool, out _ioctx);
        if (r < 0)
        {
            throw new IOException(r == -Errno.ENOENT ? $"the Ceph cluster has no pool '{o.Pool}'" : $"cannot open pool '{o.Pool}': {Errno.Describe(r)}");
        }
        r = _readOnly
            ? Rbd.rbd_open_read_only(_ioctx, o.Image, out _image, o.Snapshot)
            : Rbd.rbd_open(_ioctx, o.Image, out _image, null);
        if (r < 0)
        {
            _image = 0;
            throw new IOException(r == -Errno.ENOENT
                ? (o.Snapshot is null ? $"pool '{o.Pool}' has no image '{o.Image}'" : $"no image '{o.Pool}/{o.Image}' with a snapshot '{o.Snapshot}'")
                : $"cannot open the image {Name}: {Errno.Describe(r)}");
        }
        if (o.SnapshotId is { } snapId)
        {
            r = Rbd.rbd_snap_set_by_id(_image, snapId);
            if (r < 0)
            {
                throw new IOException(r == -Errno.ENOENT
                    ? $"the image {o.Pool}/{o.Image} has no snapshot with id {snapId} (`rbd snap ls {o.Pool}/{o.Image}` lists them)"
                    : $"cannot open snapshot id {snapId} of {o.Pool}/{o.Image}: {Errno.Describe(r)}");
            }
        }
        if (o.EncryptionFormat is not null)
        {
            LoadEncryption(o.EncryptionFormat, o.PassphraseFile!);
        }
        Check(Rbd.rbd_get_size(_image, out var size), $"reading the size of {Name}");
        _imageSize = (long)size;
        _size = (long)size & ~511L;
        if (_size == 0)
        {
            throw new IOException($"the image {Name} is {size} bytes; a device needs at least 512");
        }
        if (!_readOnly)
        {
            AcquireLock();
        }
        _self = GCHandle.Alloc(this);
        Check(Rbd.rbd_update_watch(_image, out _watchHandle, &OnHeaderUpdate, GCHandle.ToIntPtr(_self)), $"watching {Name} for resizes");
    }

    // Taken explicitly, librbd's exclusive lock is kept when another client asks for it (automatic
    // transitions are off), so two writers never interleave: the second one is refused here.
    private void AcquireLock()
    {
        Check(Rbd.rbd_get_features(_image, out var features), $"reading the features of {Name}");
        if ((features & Rbd.FeatureExclusiveLock) == 0)
        {
            return; // nothing to take: the image was made without exclusive-lock
        }
        // Broken before asking for it: librbd's own acquire would first ask the dead owner to let go
        // and wait for its watch to time out (30 s).
        if (_options.LockTakeover == RbdLockTakeover.Break)
        {
            BreakLock();
        }
        var r = Rbd.rbd_lock_acquire(_image, Rbd.LockModeExclusive);
        var deadline = Environment.TickCount64 + (long)_options.Timeout.TotalMilliseconds;
        while (r < 0 && _options.LockTakeover == RbdLockTakeover.Wait && Environment.TickCount64 < deadline)
        {
            Thread.Sleep(100);
            r = Rbd.rbd_lock_acquire(_image, Rbd.LockModeExclusive);
        }
        if (r < 0)
        {
            throw new TargetLockedException($"the image {Name} is in use: another client holds its exclusive lock, and a second writer is refused "
                + $"({Errno.Describe(r)}). Stop the other writer, or serve it with --read-only or --snap");
        }
    }

    private void LoadEncryption(string format, string passphraseFile)
    {
        byte[] passphrase;
        try
        {
            passphrase = File.ReadAllBytes(passphraseFile);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new IOException($"cannot read the passphrase file {passphraseFile}: {e.Message}", e);
        }
        try
        {
            fixed (byte* p = passphrase)
            {
                var opts = new Rbd.LuksOptions { Passphrase = p, PassphraseSize = (nuint)passphrase.Length };
                var r = Rbd.rbd_encryption_load(_image, format == "luks1" ? Rbd.EncryptionFormatLuks1 : Rbd.EncryptionFormatLuks2, &opts, (nuint)sizeof(Rbd.LuksOptions));
                if (r < 0)
                {
                    throw new IOException(r == -Errno.EOPNOTSUPP
                        ? $"this librbd cannot open encrypted images (built without libcryptsetup)"
                        : $"cannot open the {format.ToUpperInvariant()} encryption of {Name} with the passphrase in {passphraseFile}: a wrong passphrase, or the image is not {format.ToUpperInvariant()}-formatted (`rbd encryption format`) ({Errno.Describe(r)})");
                }
            }
        }
        finally
        {
            // Not kept past the load: librbd holds the key it derived.
            Array.Clear(passphrase);
        }
    }

    // A recovery's takeover: the lock's owner is the dead daemon's client (the device's record says
    // this image was ours). librbd blocklists each owner before breaking its lock (set above).
    private void BreakLock()
    {
        const int max = 8;
        var owners = stackalloc nint[max];
        nuint count = max;
        var r = Rbd.rbd_lock_get_owners(_image, out var mode, owners, ref count);
        if (r == -Errno.ENOENT || (r >= 0 && count == 0))
        {
            return; // nobody holds it any more
        }
        Check(r, $"reading who holds the lock of {Name}");
        try
        {
            for (nuint i = 0; i < count; i++)
            {
                var owner = Marshal.PtrToStringUTF8(owners[i]) ?? "?";
                r = Rbd.rbd_lock_break(_image, mode, owners[i]);
                if (r < 0 && r != -Errno.ENOENT)
                {
                    throw new IOException($"cannot take over the lock of {Name} from {owner} (the dead daemon's client): {Errno.Describe(r)}");
                }
                TargetLog.RbdLockBroken(_logger, Name, owner);
            }
        }
        finally
        {
            Rbd.rbd_lock_get_owners_cleanup(owners, count);
        }
    }

    [UnmanagedCallersOnly]
    private static void OnHeaderUpdate(nint arg)
    {
        // Nothing may unwind into librbd, not even from a logger.
        RbdTarget? t = null;
        try
        {
            t = GCHandle.FromIntPtr(arg).Target as RbdTarget;
            t?.CheckSize();
        }
        catch (Exception e) when (t is not null)
        {
            try
            {
                TargetLog.RbdWatchFailed(t._logger, e);
            }
            catch (Exception)
            {
            }
        }
        catch (Exception)
        {
        }
    }

    private void CheckSize()
    {
        if (_image == 0 || Rbd.rbd_get_size(_image, out var size) < 0)
        {
            return;
        }
        var old = Interlocked.Exchange(ref _imageSize, (long)size);
        if (old == (long)size)
        {
            return;
        }
        var grown = (long)size > Size;
        if (FollowsResizes)
        {
            TargetLog.RbdResizeFollowed(_logger, Name, old, (long)size);
            Resized?.Invoke(old, (long)size);
            return;
        }
        TargetLog.RbdResizeNotFollowed(_logger, Name, old, (long)size, Size,
            grown
                ? ": growing a ublk device needs UPDATE_SIZE (Linux 6.16 or later)" + (KernelBefore616(Environment.OSVersion.Version) ? $", and this kernel is {Environment.OSVersion.Version}" : "")
                : (long)size < Size ? ": IO past the image's new end fails" : "");
        Resized?.Invoke(old, (long)size);
    }

    /// <summary>UBLK_U_CMD_UPDATE_SIZE came with Linux 6.16.</summary>
    internal static bool KernelBefore616(Version v) => v.Major < 6 || (v.Major == 6 && v.Minor < 16);

    public override int Read(Span<byte> buffer, long offset)
    {
        fixed (byte* p = buffer)
        {
            return MapError((int)Rbd.rbd_read2(_image, (ulong)offset, (nuint)Math.Min(buffer.Length, SyncChunk), p, 0));
        }
    }

    public override int Write(ReadOnlySpan<byte> data, long offset)
    {
        if (_readOnly)
        {
            return -Errno.EROFS;
        }
        fixed (byte* p = data)
        {
            return MapError((int)Rbd.rbd_write2(_image, (ulong)offset, (nuint)Math.Min(data.Length, SyncChunk), p, 0));
        }
    }

    public override int Flush() => _readOnly ? 0 : MapError(Rbd.rbd_flush(_image));

    public override int Discard(long offset, long length)
    {
        if (_readOnly)
        {
            return -Errno.EROFS;
        }
        while (length > 0)
        {
            var chunk = Math.Min(length, SyncChunk);
            var r = Rbd.rbd_discard(_image, (ulong)offset, (ulong)chunk);
            if (r < 0)
            {
                return MapError(r);
            }
            offset += chunk;
            length -= chunk;
        }
        return 0;
    }

    public override int WriteZeroes(long offset, long length, bool mayUnmap)
    {
        if (_readOnly)
        {
            return -Errno.EROFS;
        }
        while (length > 0)
        {
            var chunk = Math.Min(length, SyncChunk);
            var r = (int)Rbd.rbd_write_zeroes(_image, (ulong)offset, (nuint)chunk, mayUnmap ? 0 : Rbd.WriteZeroesThickProvision, 0);
            if (r < 0)
            {
                return MapError(r);
            }
            offset += chunk;
            length -= chunk;
        }
        return 0;
    }

    /// <summary>
    /// Errors the block layer or an NBD client can act on keep their meaning; the rest (a cluster
    /// that timed out, a connection that was shut down) are EIO.
    /// </summary>
    internal static int MapError(int r) => r >= 0 || r is -Errno.EINVAL or -Errno.EROFS or -Errno.ENOSPC or -Errno.EOPNOTSUPP ? r : -Errno.EIO;

    /// <summary>
    /// Any number of queues: each gets its own completion mailbox and eventfd on the one image
    /// handle, which holds the exclusive lock for all of them (librbd's handle is thread-safe).
    /// </summary>
    public override UringBackend? CreateUringBackend(int queueId)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        var mailbox = new RbdCompletionMailbox(RbdUringBackend.MaxTags);
        lock (_mailboxes)
        {
            // Kept until the image is closed: librbd may call back for as long as it has IO in flight.
            _mailboxes.Add(mailbox);
        }
        return new RbdUringBackend(this, _image, mailbox);
    }

    private static void Check(int r, string what)
    {
        if (r < 0)
        {
            throw new ErrnoException(-r, what);
        }
    }

    protected override void Dispose(bool disposing)
    {
        if (!_disposed)
        {
            _disposed = true;
            Close();
        }
        base.Dispose(disposing);
    }

    private void Close()
    {
        if (_image != 0)
        {
            if (_watchHandle != 0)
            {
                _ = Rbd.rbd_update_unwatch(_image, _watchHandle);
                _watchHandle = 0;
            }
            if (!_readOnly)
            {
                _ = Rbd.rbd_flush(_image);
            }
            _ = Rbd.rbd_close(_image); // releases the exclusive lock
            _image = 0;
        }
        lock (_mailboxes)
        {
            foreach (var m in _mailboxes)
            {
                m.Dispose();
            }
            _mailboxes.Clear();
        }
        if (_self.IsAllocated)
        {
            _self.Free();
        }
        if (_ioctx != 0)
        {
            Rados.rados_ioctx_destroy(_ioctx);
            _ioctx = 0;
        }
        if (_cluster != 0)
        {
            Rados.rados_shutdown(_cluster);
            _cluster = 0;
        }
    }
}
