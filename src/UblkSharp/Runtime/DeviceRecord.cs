using System.Reflection;
using System.Text.Json;
using System.Text.Json.Serialization;

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
    public static string Directory { get; set; } = Environment.GetEnvironmentVariable("UBLKSHARP_RUN_DIR") is { Length: > 0 } dir ? System.IO.Path.GetFullPath(dir) : "/run/ublksharp";

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
        };
    }

    public static string PathFor(uint id) => System.IO.Path.Combine(Directory, $"{id}.json");

    public void Save()
    {
        StateDirectory.Ensure(Directory);
        StateDirectory.WriteAtomically(PathFor(Id), JsonSerializer.Serialize(this, DeviceRecordJson.Default.DeviceRecord));
    }

    /// <summary>
    /// The record of device <paramref name="id"/>, or null if there is none (or it is unreadable).
    /// Throws <see cref="UnsafeStateDirectoryException"/> if others may write the directory.
    /// </summary>
    public static DeviceRecord? Load(uint id)
    {
        StateDirectory.Verify(Directory);
        try
        {
            return JsonSerializer.Deserialize(File.ReadAllText(PathFor(id)), DeviceRecordJson.Default.DeviceRecord);
        }
        catch (Exception e) when (e is IOException or JsonException or UnauthorizedAccessException)
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

[JsonSourceGenerationOptions(WriteIndented = true, PropertyNamingPolicy = JsonKnownNamingPolicy.CamelCase)]
[JsonSerializable(typeof(DeviceRecord))]
internal sealed partial class DeviceRecordJson : JsonSerializerContext;
