using System.Reflection;
using System.Text.Json;

namespace UblkSharp.Runtime;

/// <summary>
/// What a daemon records about the device it serves, in /run/ublksharp/ID.json: the target and its
/// recipe (enough to rebuild it) and the daemon's pid. Written atomically (temp file, then rename),
/// so a reader never sees half a record, and readable by its owner only, in a directory that only
/// its owner may write (see <see cref="StateDirectory"/>).
/// </summary>
public sealed record DeviceRecord
{
    // Absolute: a daemon changes its directory to / (see DaemonHost).
    public static string Directory { get; set; } = DefaultDirectory();

    /// <summary>
    /// UBLKSHARP_RUN_DIR, else /run/ublksharp for root. A user's devices (UNPRIVILEGED_DEV) are
    /// recorded in their own runtime directory: $XDG_RUNTIME_DIR/ublksharp, or /run/user/UID/ublksharp
    /// where the session has one, else /tmp/ublksharp-UID (refused by <see cref="StateDirectory.Verify"/>
    /// if anyone else made it first).
    /// </summary>
    public static string DefaultDirectory()
    {
        if (Environment.GetEnvironmentVariable("UBLKSHARP_RUN_DIR") is { Length: > 0 } dir)
        {
            return System.IO.Path.GetFullPath(dir);
        }
        var uid = Interop.Libc.geteuid();
        if (uid == 0)
        {
            return "/run/ublksharp";
        }
        if (Environment.GetEnvironmentVariable("XDG_RUNTIME_DIR") is { Length: > 0 } xdg && System.IO.Path.IsPathFullyQualified(xdg))
        {
            return System.IO.Path.Combine(xdg, "ublksharp");
        }
        var session = $"/run/user/{uid}";
        return System.IO.Directory.Exists(session) ? System.IO.Path.Combine(session, "ublksharp") : $"/tmp/ublksharp-{uid}";
    }

    public required uint Id { get; init; }

    public required int Pid { get; init; }

    /// <summary>
    /// When the daemon started (<see cref="Interop.Processes.StartTime"/>): with <see cref="Pid"/> it
    /// proves that a live process is this daemon, not a later one given the same pid. Records of
    /// older versions lack it.
    /// </summary>
    public long? DaemonStartTime { get; init; }

    /// <summary>The daemon's executable (/proc/PID/exe), checked along with the start time.</summary>
    public string? DaemonExecutable { get; init; }

    public required string Target { get; init; }

    public required Dictionary<string, string> Recipe { get; init; }

    public required int Queues { get; init; }

    public required int Depth { get; init; }

    public required long Size { get; init; }

    public int MaxIoBytes { get; init; } = 512 * 1024;

    /// <summary>off, on, reissue or fail-io (see <see cref="RecoveryMode"/>).</summary>
    public string Recovery { get; init; } = "off";

    public bool Autoclear { get; init; }

    /// <summary>The supervising process that recovers the device when the daemon dies, if any.</summary>
    public int SupervisorPid { get; init; }

    public DateTimeOffset Created { get; init; } = DateTimeOffset.UtcNow;

    /// <summary>The UblkSharp build the daemon runs (<see cref="CurrentVersion"/>); records of older versions lack it.</summary>
    public string? Version { get; init; }

    /// <summary>
    /// Whether the target's state is whole on disk even when its daemon dies (<see cref="Targets.BlockTarget.SurvivesRestart"/>).
    /// False for a writable cow overlay, whose latest bitmap bits live in the daemon's memory: such a
    /// device can be handed over (<see cref="Released"/>) but not recovered after a crash.
    /// </summary>
    public bool CrashSafe { get; init; } = true;

    /// <summary>
    /// Set by a daemon that handed the device over: its target's state is on disk and it serves no
    /// more, so the next daemon may take the device even if <see cref="CrashSafe"/> is false.
    /// </summary>
    public bool Released { get; init; }

    /// <summary>Where the daemon serves its figures for Prometheus (`add --metrics`), or null; a recovery serves them there again.</summary>
    public string? Metrics { get; init; }

    /// <summary>
    /// The identities of the files the recipe names (<see cref="FileIdentity.RecipeKeys"/>) when the
    /// device was added, so that a recovery never opens another file under the same path. Records of
    /// older versions lack them (and are trusted as before).
    /// </summary>
    public IReadOnlyDictionary<string, FileIdentity>? Files { get; init; }

    /// <summary>Why a daemon must not open this record's files for the device (one is not the file recorded), or null.</summary>
    public string? FilesProblem()
    {
        if (Files is null)
        {
            return null;
        }
        foreach (var (key, recorded) in Files)
        {
            if (Recipe.TryGetValue(key, out var path) && FileIdentity.Mismatch(Id, key, path, recorded, FileIdentity.Of(path)) is string problem)
            {
                return problem;
            }
        }
        return null;
    }

    /// <summary>This process's UblkSharp build: the assembly's informational version (with the commit, where the build had one).</summary>
    public static string CurrentVersion { get; } =
        typeof(DeviceRecord).Assembly.GetCustomAttribute<AssemblyInformationalVersionAttribute>()?.InformationalVersion ?? "unknown";

    /// <summary>The record of a device this process serves: its shape and recovery mode as the kernel reports them.</summary>
    public static DeviceRecord Of(UblkDevice device, string target, Dictionary<string, string> recipe, long size)
    {
        ArgumentNullException.ThrowIfNull(device);
        return new DeviceRecord
        {
            Id = device.Id,
            Pid = Environment.ProcessId,
            DaemonStartTime = Interop.Processes.StartTime(Environment.ProcessId),
            DaemonExecutable = Interop.Processes.ExecutablePath(Environment.ProcessId),
            Target = target,
            Recipe = recipe,
            Queues = device.Info.nr_hw_queues,
            Depth = device.Info.queue_depth,
            Size = size,
            MaxIoBytes = (int)device.Info.max_io_buf_bytes,
            Recovery = RecoveryModes.FromFlags((Ublk.UblkFeatures)device.Info.flags).Name(),
            Version = CurrentVersion,
            CrashSafe = device.Target.SurvivesRestart,
        };
    }

    /// <summary>The device's shape and recovery mode as recorded: what a recovery of it must use.</summary>
    public DeviceOptions RecoveryOptions() => new()
    {
        Queues = Queues,
        Depth = Depth,
        MaxIoBytes = MaxIoBytes,
        Recovery = RecoveryModes.Parse(Recovery),
    };

    public static string PathFor(uint id) => System.IO.Path.Combine(Directory, $"{id}.json");

    public void Save()
    {
        StateDirectory.Ensure(Directory);
        StateDirectory.WriteAtomically(PathFor(Id), ToJson());
    }

    // Written and read by hand, not by JsonSerializer: building a serializer's metadata for this
    // type cost 1-1.2 s of JIT per process under TCG, paid by every add, recover and del.

    /// <summary>The record as the JSON of /run/ublksharp/ID.json (camelCase, indented).</summary>
    public string ToJson()
    {
        var buffer = new System.Buffers.ArrayBufferWriter<byte>(1024);
        using (var w = new Utf8JsonWriter(buffer, new JsonWriterOptions { Indented = true }))
        {
            w.WriteStartObject();
            w.WriteNumber("id", Id);
            w.WriteNumber("pid", Pid);
            if (DaemonStartTime is long start)
            {
                w.WriteNumber("daemonStartTime", start);
            }
            else
            {
                w.WriteNull("daemonStartTime");
            }
            w.WriteString("daemonExecutable", DaemonExecutable);
            w.WriteString("target", Target);
            w.WriteStartObject("recipe");
            foreach (var (key, value) in Recipe)
            {
                w.WriteString(key, value);
            }
            w.WriteEndObject();
            w.WriteNumber("queues", Queues);
            w.WriteNumber("depth", Depth);
            w.WriteNumber("size", Size);
            w.WriteNumber("maxIoBytes", MaxIoBytes);
            w.WriteString("recovery", Recovery);
            w.WriteBoolean("autoclear", Autoclear);
            w.WriteNumber("supervisorPid", SupervisorPid);
            w.WriteString("created", Created);
            w.WriteString("version", Version);
            // Only when they differ from their defaults: records stay as they were for other targets.
            if (!CrashSafe)
            {
                w.WriteBoolean("crashSafe", false);
            }
            if (Released)
            {
                w.WriteBoolean("released", true);
            }
            if (Metrics is not null)
            {
                w.WriteString("metrics", Metrics);
            }
            if (Files is { Count: > 0 })
            {
                w.WriteStartObject("files");
                foreach (var (key, id) in Files)
                {
                    w.WriteStartObject(key);
                    w.WriteNumber("dev", id.Device);
                    w.WriteNumber("ino", id.Inode);
                    w.WriteEndObject();
                }
                w.WriteEndObject();
            }
            w.WriteEndObject();
        }
        return System.Text.Encoding.UTF8.GetString(buffer.WrittenSpan);
    }

    /// <summary>A record from its JSON; <see cref="JsonException"/> if it is not one (a required member missing or of the wrong kind).</summary>
    public static DeviceRecord Parse(string json)
    {
        using var doc = JsonDocument.Parse(json);
        var root = doc.RootElement;
        if (root.ValueKind != JsonValueKind.Object)
        {
            throw new JsonException("a device record is a JSON object");
        }
        try
        {
            Dictionary<string, FileIdentity>? files = null;
            if (Optional(root, "files") is JsonElement f)
            {
                files = [];
                foreach (var p in f.EnumerateObject())
                {
                    files[p.Name] = new FileIdentity(Required(p.Value, "dev").GetUInt64(), Required(p.Value, "ino").GetUInt64());
                }
            }
            var recipe = new Dictionary<string, string>();
            foreach (var p in Required(root, "recipe").EnumerateObject())
            {
                recipe[p.Name] = p.Value.GetString() ?? throw new JsonException($"recipe member '{p.Name}' is null");
            }
            return new DeviceRecord
            {
                Id = Required(root, "id").GetUInt32(),
                Pid = Required(root, "pid").GetInt32(),
                DaemonStartTime = Optional(root, "daemonStartTime")?.GetInt64(),
                DaemonExecutable = Optional(root, "daemonExecutable")?.GetString(),
                Target = Required(root, "target").GetString() ?? throw new JsonException("'target' is null"),
                Recipe = recipe,
                Queues = Required(root, "queues").GetInt32(),
                Depth = Required(root, "depth").GetInt32(),
                Size = Required(root, "size").GetInt64(),
                MaxIoBytes = Optional(root, "maxIoBytes")?.GetInt32() ?? 512 * 1024,
                Recovery = Optional(root, "recovery")?.GetString() ?? "off",
                Autoclear = Optional(root, "autoclear")?.GetBoolean() ?? false,
                SupervisorPid = Optional(root, "supervisorPid")?.GetInt32() ?? 0,
                Created = Optional(root, "created")?.GetDateTimeOffset() ?? DateTimeOffset.UtcNow,
                Version = Optional(root, "version")?.GetString(),
                CrashSafe = Optional(root, "crashSafe")?.GetBoolean() ?? true,
                Released = Optional(root, "released")?.GetBoolean() ?? false,
                Metrics = Optional(root, "metrics")?.GetString(),
                Files = files,
            };
        }
        catch (Exception e) when (e is InvalidOperationException or FormatException)
        {
            // A member of the wrong JSON kind, or a number out of range.
            throw new JsonException($"not a device record: {e.Message}", e);
        }
    }

    private static JsonElement Required(JsonElement root, string name) =>
        Optional(root, name) ?? throw new JsonException($"a device record needs '{name}'");

    private static JsonElement? Optional(JsonElement root, string name) =>
        root.TryGetProperty(name, out var value) && value.ValueKind != JsonValueKind.Null ? value : null;

    /// <summary>
    /// The record of device <paramref name="id"/>, or null if there is none (or it is unreadable).
    /// Throws <see cref="UnsafeStateDirectoryException"/> if others may write the directory, and
    /// <see cref="UnsafeStateFileException"/> if the record is not root's (or this user's) or others
    /// may write it: a daemon would serve whatever files it names.
    /// </summary>
    public static DeviceRecord? Load(uint id)
    {
        StateDirectory.Verify(Directory);
        try
        {
            return Parse(StateDirectory.ReadVerified(PathFor(id)));
        }
        catch (Exception e) when (e is (IOException and not UnsafeStateFileException) or JsonException or UnauthorizedAccessException)
        {
            return null;
        }
    }

    public static void Remove(uint id)
    {
        StateDirectory.Verify(Directory);
        try
        {
            File.Delete(PathFor(id));
        }
        catch (IOException)
        {
        }
    }
}
