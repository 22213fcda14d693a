using System.Globalization;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;

using UblkSharp.Nbd.Protocol;

namespace UblkSharp.Targets;

/// <summary>
/// Builds a target from its kind and options (the same "recipe" a device records, so a daemon or
/// a later recovery can rebuild it). Bad options throw <see cref="ArgumentException"/> with a
/// message meant for the person who typed them.
/// </summary>
public static class TargetFactory
{
    /// <summary>
    /// The option `recover` adds to a recipe (and never records): "break" after a crash, "wait"
    /// after a hand-over. A target that holds a lock of its backing (rbd) takes it over accordingly.
    /// </summary>
    public const string TakeoverKey = "takeover";

    public static IReadOnlyList<string> Kinds { get; } = ["null", "mem", "loop", "fault", "cow", "qcow2", "nbd", "rbd"];

    /// <summary>
    /// The target <paramref name="kind"/> with <paramref name="options"/>; the targets that log (nbd,
    /// rbd) log to <paramref name="loggerFactory"/> (by default nowhere).
    /// </summary>
    public static BlockTarget Create(string kind, IReadOnlyDictionary<string, string> options, ILoggerFactory? loggerFactory = null)
    {
        ArgumentNullException.ThrowIfNull(options);
        loggerFactory ??= NullLoggerFactory.Instance;
        return kind switch
        {
            "null" => new NullTarget(Size(options, "size", 250L << 30, 512)),
            "mem" => new MemoryTarget(Size(options, "size", null, 4096)),
            "loop" => CreateLoop(options),
            "fault" => CreateFault(options),
            "cow" => CreateCow(options),
            "qcow2" => CreateQcow2(options),
            "nbd" => CreateNbd(options, loggerFactory),
            "rbd" => CreateRbd(options, loggerFactory),
            _ => throw new ArgumentException($"unknown target type '{kind}': use one of {string.Join(", ", Kinds)}"),
        };
    }

    private static NbdTarget CreateNbd(IReadOnlyDictionary<string, string> o, ILoggerFactory loggerFactory)
    {
        if (!o.TryGetValue("uri", out var uri) || string.IsNullOrEmpty(uri))
        {
            throw new ArgumentException("the nbd target needs --uri nbd://HOST:PORT/EXPORT or nbd+unix:///EXPORT?socket=PATH (nbds:// and nbds+unix:// for TLS)");
        }
        var timeout = Number(o, "timeout", 30);
        if (timeout < 1)
        {
            throw new ArgumentException("bad --timeout '0': give at least 1 second");
        }
        // Parsing and loading certificates throw ArgumentException; a server that cannot be reached, IOException naming it.
        var parsed = NbdUri.Parse(uri);
        NbdClientTlsOptions? tls = null;
        if (o.TryGetValue("tls-certificates", out var certificates) && !string.IsNullOrEmpty(certificates))
        {
            if (!parsed.IsTls)
            {
                throw new ArgumentException($"--tls-certificates is for TLS: use an nbds:// or nbds+unix:// URI, not {uri}");
            }
            tls = NbdClientTlsOptions.Load(certificates);
        }
        if (o.TryGetValue("tls-psk", out var pskFile) && !string.IsNullOrEmpty(pskFile))
        {
            if (!parsed.IsTls)
            {
                throw new ArgumentException($"--tls-psk is for TLS: use an nbds:// or nbds+unix:// URI, not {uri}");
            }
            if (tls is not null || parsed.TlsCertificates is not null)
            {
                throw new ArgumentException("--tls-psk (PSK) and TLS certificates (x509) exclude each other: give one");
            }
            // The identity: --tls-username (kept in recipes), else the URI's user, else the login name (as libnbd).
            var username = o.TryGetValue("tls-username", out var u) && !string.IsNullOrEmpty(u) ? u : parsed.TlsUsername ?? Environment.UserName;
            tls = NbdClientTlsOptions.LoadPsk(pskFile, username);
        }
        return new NbdTarget(parsed, new NbdTargetOptions { Timeout = TimeSpan.FromSeconds(timeout), Tls = tls, LoggerFactory = loggerFactory });
    }

    /// <summary>
    /// An RBD image: "pool", "image", optional "conf", "id", "keyring" or "keyfile" (cephx), "snap"
    /// or "snap-id", "read-only", "cache" (default, writethrough, none), "encryption-format" (luks1,
    /// luks2) with "passphrase-file", "timeout" (seconds), and
    /// <see cref="TakeoverKey"/> (recover's). A cluster, pool or image that cannot be reached or found is an IOException naming it.
    /// </summary>
    private static RbdTarget CreateRbd(IReadOnlyDictionary<string, string> o, ILoggerFactory loggerFactory)
    {
        string Need(string key, string example)
            => o.TryGetValue(key, out var v) && !string.IsNullOrEmpty(v) ? v : throw new ArgumentException($"the rbd target needs --{key} {example}");
        var pool = Need("pool", "POOL");
        var image = Need("image", "IMAGE");
        var conf = o.TryGetValue("conf", out var c) && !string.IsNullOrEmpty(c) ? c : null;
        if (conf is not null && !File.Exists(conf))
        {
            throw new ArgumentException($"{conf}: no such Ceph configuration file");
        }
        var keyring = o.TryGetValue("keyring", out var k) && !string.IsNullOrEmpty(k) ? k : null;
        var keyFile = o.TryGetValue("keyfile", out var kf) && !string.IsNullOrEmpty(kf) ? kf : null;
        if (keyring is not null && keyFile is not null)
        {
            throw new ArgumentException("--keyring and --keyfile exclude each other: give one");
        }
        foreach (var (option, file) in new[] { ("--keyring", keyring), ("--keyfile", keyFile) })
        {
            if (file is not null && !File.Exists(file))
            {
                throw new ArgumentException($"{option} {file}: no such file");
            }
        }
        var timeout = Number(o, "timeout", 30);
        if (timeout < 1)
        {
            throw new ArgumentException("bad --timeout '0': give at least 1 second");
        }
        ulong? snapId = null;
        if (o.TryGetValue("snap-id", out var sid) && !string.IsNullOrEmpty(sid))
        {
            snapId = ulong.TryParse(sid, NumberStyles.None, CultureInfo.InvariantCulture, out var parsed)
                ? parsed : throw new ArgumentException($"bad --snap-id '{sid}': give the snapshot's number, as `rbd snap ls` shows it");
            if (o.TryGetValue("snap", out var snapName) && !string.IsNullOrEmpty(snapName))
            {
                throw new ArgumentException("--snap and --snap-id exclude each other: give one");
            }
        }
        var cache = o.TryGetValue("cache", out var cv) && !string.IsNullOrEmpty(cv) ? cv switch
        {
            "default" => RbdCache.Default,
            "writethrough" => RbdCache.Writethrough,
            "none" => RbdCache.None,
            _ => throw new ArgumentException($"bad --rbd-cache '{cv}': use default, writethrough or none"),
        } : RbdCache.Default;
        var encryption = o.TryGetValue("encryption-format", out var ef) && !string.IsNullOrEmpty(ef) ? ef : null;
        var passphrase = o.TryGetValue("passphrase-file", out var pf) && !string.IsNullOrEmpty(pf) ? pf : null;
        if (encryption is not null && encryption is not ("luks1" or "luks2"))
        {
            throw new ArgumentException($"bad --encryption-format '{encryption}': use luks1 or luks2");
        }
        if ((encryption is null) != (passphrase is null))
        {
            throw new ArgumentException("--encryption-format and --passphrase-file go together: give both");
        }
        if (passphrase is not null && !File.Exists(passphrase))
        {
            throw new ArgumentException($"--passphrase-file {passphrase}: no such file");
        }
        return new RbdTarget(new RbdTargetOptions
        {
            EncryptionFormat = encryption,
            PassphraseFile = passphrase is null ? null : Path.GetFullPath(passphrase),
            Cache = cache,
            // Only `recover` sets it (never a recipe): the previous daemon's lock is taken over.
            LockTakeover = o.TryGetValue(TakeoverKey, out var tk) ? tk switch
            {
                "break" => RbdLockTakeover.Break,
                "wait" => RbdLockTakeover.Wait,
                _ => RbdLockTakeover.None,
            } : RbdLockTakeover.None,
            SnapshotId = snapId,
            Keyring = keyring is null ? null : Path.GetFullPath(keyring),
            KeyFile = keyFile is null ? null : Path.GetFullPath(keyFile),
            Pool = pool,
            Image = image,
            ConfigFile = conf is null ? null : Path.GetFullPath(conf),
            ClientId = o.TryGetValue("id", out var id) && !string.IsNullOrEmpty(id) ? id : "admin",
            Snapshot = o.TryGetValue("snap", out var snap) && !string.IsNullOrEmpty(snap) ? snap : null,
            ReadOnly = Flag(o, "read-only"),
            Timeout = TimeSpan.FromSeconds(timeout),
            LoggerFactory = loggerFactory,
        });
    }

    private static LoopTarget CreateLoop(IReadOnlyDictionary<string, string> o)
    {
        if (!o.TryGetValue("file", out var file) || string.IsNullOrEmpty(file))
        {
            throw new ArgumentException("the loop target needs a backing file: -f FILE");
        }
        if (Directory.Exists(file))
        {
            throw new ArgumentException($"{file} is a directory, not a file or block device");
        }
        if (!File.Exists(file) && !file.StartsWith("/dev/", StringComparison.Ordinal))
        {
            throw new ArgumentException($"{file}: no such file");
        }
        var directIo = Flag(o, "direct-io");
        try
        {
            return new LoopTarget(Path.GetFullPath(file), directIo, Flag(o, "read-only"), Io(o));
        }
        catch (Interop.ErrnoException e) when (e.Errno == Interop.Errno.EINVAL && directIo)
        {
            // open(2) fails O_DIRECT with EINVAL where the file system cannot do direct IO (procfs, FUSE, old tmpfs).
            throw new ArgumentException($"{file}: cannot open it with --direct-io: its file system does not support O_DIRECT", e);
        }
        catch (Interop.ErrnoException e)
        {
            throw new ArgumentException($"{file}: cannot open it: {Interop.Errno.Describe(e.Errno)}", e);
        }
    }

    /// <summary>
    /// A UML COW overlay: "file" (the COW file), "create" with "backing" to make a new one,
    /// "backing" alone to use another backing file than the header's, "ignore-backing-mismatch",
    /// "read-only", "io", "allocate" (the allocation chunk, 0 for none), "writeback" (seconds).
    /// The recipe a cow target records has no "create": rebuilding it reopens the file.
    /// </summary>
    private static Cow.CowTarget CreateCow(IReadOnlyDictionary<string, string> o)
    {
        if (!o.TryGetValue("file", out var file) || string.IsNullOrEmpty(file))
        {
            throw new ArgumentException("the cow target needs its COW file: -f OVERLAY (with --create --backing BASE to make a new one)");
        }
        var backing = o.TryGetValue("backing", out var b) && !string.IsNullOrEmpty(b) ? b : null;
        try
        {
            if (Flag(o, "create"))
            {
                if (backing is null)
                {
                    throw new ArgumentException("--create makes a new COW file over a backing file: give it with --backing BASE");
                }
                Cow.CowTarget.CreateOverlay(file, backing);
                backing = null;
            }
            return new Cow.CowTarget(file, new Cow.CowOpenOptions
            {
                BackingFile = backing,
                IgnoreBackingMismatch = Flag(o, "ignore-backing-mismatch"),
                ReadOnly = Flag(o, "read-only"),
                Io = Io(o),
                AllocationChunk = AllocationChunk(o),
                BitmapWriteback = Writeback(o),
            });
        }
        catch (IOException e)
        {
            // Format errors, a changed backing file, a file in use: all about what was typed or named.
            throw new ArgumentException(e.Message, e);
        }
    }

    /// <summary>
    /// A qcow2 image: "file" (the image), "read-only" (else the top image is written; refused for
    /// images with internal snapshots, extended L2 entries, the dirty or corrupt bit), "backing"
    /// (instead of the backing file the header names), "snapshot" (an internal snapshot's id or
    /// name; read-only only), "cache-size" (bytes of L2 tables per image); "create" with "size"
    /// (else the backing file's size) and optionally "backing" makes a new image first (the
    /// recipe then has no "create": rebuilding it reopens the image).
    /// </summary>
    private static Qcow2.Qcow2Target CreateQcow2(IReadOnlyDictionary<string, string> o)
    {
        if (!o.TryGetValue("file", out var file) || string.IsNullOrEmpty(file))
        {
            throw new ArgumentException("the qcow2 target needs its image: -f IMAGE");
        }
        var cacheSize = Qcow2.Qcow2OpenOptions.DefaultCacheSize;
        if (o.TryGetValue("cache-size", out var c) && (!ByteSize.TryParse(c, out cacheSize) || cacheSize < 0))
        {
            throw new ArgumentException($"bad --cache-size '{c}': give the bytes of L2 tables to keep per image, e.g. 1M (at least one table is kept)");
        }
        var backing = o.TryGetValue("backing", out var b) && !string.IsNullOrEmpty(b) ? b : null;
        try
        {
            if (Flag(o, "create"))
            {
                if (Flag(o, "read-only"))
                {
                    throw new ArgumentException("--create makes a new image to write: drop --read-only");
                }
                long size;
                if (o.ContainsKey("size") || backing is null)
                {
                    size = Size(o, "size", null, 512);
                }
                else
                {
                    var full = Path.IsPathRooted(backing) ? backing : Path.Combine(Path.GetDirectoryName(Path.GetFullPath(file))!, backing);
                    using var probe = File.OpenHandle(full, FileMode.Open, FileAccess.Read);
                    var magic = new byte[4];
                    var isQcow2 = RandomAccess.Read(probe, magic, 0) == 4 && Qcow2.Qcow2Header.HasMagic(magic);
                    if (isQcow2)
                    {
                        using var baseImage = new Qcow2.Qcow2Target(full);
                        size = baseImage.Size;
                    }
                    else
                    {
                        size = RandomAccess.GetLength(probe) & ~511L;
                    }
                }
                if (File.Exists(file))
                {
                    throw new ArgumentException($"{file} exists: --create makes a new image and never overwrites one");
                }
                Qcow2.Qcow2Target.Create(file, size, backing);
                backing = null;
            }
            return new Qcow2.Qcow2Target(file, new Qcow2.Qcow2OpenOptions
            {
                BackingFile = backing,
                Snapshot = o.TryGetValue("snapshot", out var snap) && !string.IsNullOrEmpty(snap) ? snap : null,
                CacheSize = cacheSize,
                Writable = !Flag(o, "read-only"),
            });
        }
        catch (IOException e)
        {
            // Format errors, missing files, refused features: all about what was typed or named.
            throw new ArgumentException(e.Message, e);
        }
    }

    private static FaultTarget CreateFault(IReadOnlyDictionary<string, string> o)
    {
        var baseKind = o.TryGetValue("base", out var b) ? b : "mem";
        if (baseKind == "fault")
        {
            throw new ArgumentException("a fault target cannot wrap another fault target");
        }
        var schedule = new FaultSchedule
        {
            Seed = (int)Number(o, "seed", 1),
            ShortIo = Rate(o, "short"),
            Again = Rate(o, "eagain"),
            Eio = Rate(o, "eio"),
            Delay = Rate(o, "delay"),
            DelayMs = (int)Number(o, "delay-ms", 5),
        };
        try
        {
            schedule.Validate();
        }
        catch (ArgumentOutOfRangeException e)
        {
            throw new ArgumentException(e.Message.Split(" (Parameter")[0], e);
        }
        return new FaultTarget(Create(baseKind, o), schedule);
    }

    private static long Size(IReadOnlyDictionary<string, string> o, string key, long? fallback, int multiple)
    {
        if (!o.TryGetValue(key, out var text))
        {
            return fallback ?? throw new ArgumentException($"this target needs --{key}, e.g. --{key} 1G");
        }
        if (!ByteSize.TryParse(text, out var bytes))
        {
            throw new ArgumentException($"bad size '{text}': give a number of bytes with an optional K, M, G or T suffix, e.g. 512M");
        }
        if (bytes % multiple != 0)
        {
            throw new ArgumentException($"bad size '{text}': it must be a multiple of {multiple} bytes");
        }
        return bytes;
    }

    private static double Rate(IReadOnlyDictionary<string, string> o, string key)
    {
        if (!o.TryGetValue(key, out var text))
        {
            return 0;
        }
        if (!double.TryParse(text, NumberStyles.Float, CultureInfo.InvariantCulture, out var v) || v < 0 || v > 1)
        {
            throw new ArgumentException($"bad --{key} '{text}': give a probability from 0 to 1");
        }
        return v;
    }

    private static long Number(IReadOnlyDictionary<string, string> o, string key, long fallback)
    {
        if (!o.TryGetValue(key, out var text))
        {
            return fallback;
        }
        if (!long.TryParse(text, NumberStyles.Integer, CultureInfo.InvariantCulture, out var v) || v < 0 || v > int.MaxValue)
        {
            throw new ArgumentException($"bad --{key} '{text}': give a whole number");
        }
        return v;
    }

    /// <summary>"allocate": 0, or a power of two of at least 4K (the default 64K).</summary>
    private static long AllocationChunk(IReadOnlyDictionary<string, string> o)
    {
        if (!o.TryGetValue("allocate", out var v))
        {
            return Cow.CowOpenOptions.DefaultAllocationChunk;
        }
        if (v.Trim() == "0")
        {
            return 0;
        }
        if (!ByteSize.TryParse(v, out var chunk) || chunk < 4096 || (chunk & (chunk - 1)) != 0)
        {
            throw new ArgumentException($"--allocate {v}: give 0 (no allocation ahead) or a power of two of at least 4K, e.g. 64K or 1M");
        }
        return chunk;
    }

    /// <summary>"writeback": seconds between bitmap writeback rounds, 0 for none (the default 30).</summary>
    private static TimeSpan Writeback(IReadOnlyDictionary<string, string> o)
    {
        if (!o.TryGetValue("writeback", out var v))
        {
            return Cow.CowOpenOptions.DefaultBitmapWriteback;
        }
        if (!double.TryParse(v, System.Globalization.NumberStyles.AllowDecimalPoint, System.Globalization.CultureInfo.InvariantCulture, out var s) || s > 86400)
        {
            throw new ArgumentException($"--writeback {v}: give the seconds between bitmap writeback rounds, e.g. 30, or 0 for only on flush");
        }
        return TimeSpan.FromSeconds(s);
    }

    /// <summary>"io": ring, sync or auto (the default).</summary>
    private static LoopIo Io(IReadOnlyDictionary<string, string> o) => o.TryGetValue("io", out var v) ? v switch
    {
        "ring" => LoopIo.Ring,
        "sync" => LoopIo.Sync,
        "auto" or "" => LoopIo.Auto,
        _ => throw new ArgumentException($"--io {v}: use ring, sync or auto"),
    } : LoopIo.Auto;

    private static bool Flag(IReadOnlyDictionary<string, string> o, string key)
        => o.TryGetValue(key, out var v) && v is "on" or "true" or "1" or "yes";
}
