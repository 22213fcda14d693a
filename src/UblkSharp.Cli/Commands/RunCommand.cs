using System.CommandLine;
using UblkSharp.Cli.Logging;
using UblkSharp.Interop;
using UblkSharp.Runtime;
using UblkSharp.Targets;
using UblkSharp.Ublk;

namespace UblkSharp.Cli.Commands;

/// <summary>
/// `ublksharp run NAME`: serves the device a file describes (<see cref="ServiceConfig"/>) in this
/// process, for a systemd unit (`ublksharp@NAME.service`, Type=notify: READY=1 once the device
/// serves IO, STOPPING=1 on stop). A device its crashed run left waiting (recovery on or reissue)
/// is recovered, so Restart=on-failure loses no IO; a device no daemon can bring back (an orphan)
/// is deleted and added again; otherwise the device is added. SIGTERM stops and deletes it.
/// </summary>
internal static class RunCommand
{
    public static Command Create()
    {
        var name = new Argument<string>("NAME") { Description = "A device description: /etc/ublksharp/NAME.json, or a path to one" };
        var command = new Command("run", "Serve the device a description file names, in this process (for systemd: ublksharp@NAME.service)") { name };
        command.SetAction(r =>
        {
            var config = ServiceConfig.Load(r.GetValue(name)!);
            var options = config.DeviceOptions();
            options.Validate();
            // Bad options are reported before anything touches the device.
            TargetFactory.Create(config.Target, config.Options).Dispose();
            Preflight.RequireRootAndDriver();
            if (Recoverable(config) is DeviceRecord record)
            {
                CliLog.Warning($"{config}: device {config.Id} waits for a daemon since its last run ended; recovering it");
                if (record.Target != config.Target || !SameRecipe(record.Recipe, config.Options))
                {
                    // The device's data is what its recorded target serves: changes apply at the next fresh start.
                    CliLog.Warning($"{config.Path} changed since device {config.Id} was added; the recovery serves the recorded target ({record.Target}); the change applies once the device is deleted");
                }
                return DaemonHost.Serve(record.Target, record.Recipe, record.RecoveryOptions(), record.Autoclear, config.Id, null, handedOver: record.Released, metrics: record.Metrics);
            }
            return DaemonHost.Serve(config.Target, config.Options, options, config.Autoclear, null, null, metrics: config.Metrics);
        });
        return command;
    }

    // The record of the device if its last daemon is gone and it can be recovered; null if there
    // is no such device (an orphan is deleted first). A device some daemon serves is refused.
    private static DeviceRecord? Recoverable(ServiceConfig config)
    {
        var id = config.Id;
        using var control = ControlDevice.Open();
        DevInfo info;
        try
        {
            info = control.GetDeviceInfo(id);
        }
        catch (ErrnoException e) when (e.Errno == Errno.ENODEV)
        {
            return null;
        }
        var record = DeviceRecord.Load(id);
        if (Orphans.Reason(id, info, record) is string orphan)
        {
            CliLog.Warning($"{config}: device {id} is an orphan ({orphan}); deleting it to add it again");
            DeviceDeletion.Delete(control, id, force: true, CliLog.Logger);
            return null;
        }
        if (Orphans.DaemonAlive(id, info, record))
        {
            throw new ArgumentException($"{config}: device {id} is served by another process (pid {info.ublksrv_pid}); stop it first ('ublksharp del -n {id}')");
        }
        Recoverability.Check(id, info);
        // As recover: never another file under a path the device was added with.
        if (record?.FilesProblem() is string replaced)
        {
            throw new RecoveryRefusedException(replaced);
        }
        return record;
    }

    private static bool SameRecipe(Dictionary<string, string> a, Dictionary<string, string> b) =>
        a.Count == b.Count && a.All(kv => b.TryGetValue(kv.Key, out var v) && v == kv.Value);
}
